"""C++ headers shared by the CPU kernels (``cpu_shared.h``); no Python: the build (``cpu_ffi_build.py``) includes them."""
