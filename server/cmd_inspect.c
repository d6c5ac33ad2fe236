/* cmd_inspect.c - to be written */
