"""duo.v1 protocol: duo.proto and the stubs generated from it by generate.py."""
