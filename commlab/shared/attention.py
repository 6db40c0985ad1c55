"""The attention kinds a model can use and the training simulator can price: softmax (scaled dot
product) and linear (Katharopoulos et al. 2020, elu + 1 feature map; `commlab.models.attention`)."""

from __future__ import annotations

ATTENTIONS = ("softmax", "linear")
