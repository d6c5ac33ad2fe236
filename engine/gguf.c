/* gguf.c - to be written */
