"""The backend's name in torch.distributed's table (`dist.init_process_group("commlab")`): its own module so
that the package's registration and the process group share it without importing each other."""

BACKEND_NAME = "commlab"
