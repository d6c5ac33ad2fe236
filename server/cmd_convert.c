/* cmd_convert.c - to be written */
