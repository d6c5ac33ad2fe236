/* convert.c - to be written */
