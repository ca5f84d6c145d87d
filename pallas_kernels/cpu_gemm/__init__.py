"""C++ bf16 weight products for XLA:CPU (an FFI custom call built at first use)."""
