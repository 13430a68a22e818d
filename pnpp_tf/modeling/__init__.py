"""The model: backbones (the registry and its trunks), the embedder, the ProxyNCA++ loss and the
optimisers, and `ProxyNCAModel`, whose train step updates the network and the proxies with two
optimisers."""
