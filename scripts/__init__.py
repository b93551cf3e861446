"""The command-line scripts; installed as ``elbogap_scripts`` (console commands elbogap-*)."""
