pytest_plugins = [
    "tests.fix_containerd",
    "tests.registry_fix",
    "tests.stargz_fix",
    "tests.hostile_fix",
]
