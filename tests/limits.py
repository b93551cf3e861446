"""How long a test waits on a process of its own before calling it hung.

Only a hang ends a test this way, never slowness: on a loaded 2-core machine a fit that takes
40 s alone can take several minutes, and a fixed 300 s limit failed there."""

HANG_SECONDS = 1800
