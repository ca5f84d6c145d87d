"""CPU ragged paged attention: a C++ kernel behind an XLA FFI custom call (see README.md)."""
