/* cmd_complete.c - to be written */
