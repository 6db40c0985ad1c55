"""The emulated cluster: simulator topologies built as network namespaces, bridges and shaped veth pairs.

commlab testbed up --topology switch:n=2,bandwidth=200Mb/s
commlab testbed run -- commlab bench allreduce -b 1M -e 64M
commlab testbed down
"""
