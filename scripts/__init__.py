"""The command line: argument parsing and printing over the library, installed as
``elbogap.cli`` with the console commands ``elbogap-fit``, ``elbogap-evaluate``,
``elbogap-report``, ``elbogap-compare`` and ``elbogap-kl-directions``.  From a checkout each is
also ``python scripts/NAME.py``."""
