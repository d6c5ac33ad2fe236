/* gguf_writer.c - to be written */
