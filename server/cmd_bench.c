/* cmd_bench.c - to be written */
