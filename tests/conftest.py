pytest_plugins = ["tests.fix_containerd"]
