/*
 * commands.h - the `codemoe` subcommands. main.c dispatches `codemoe <cmd> ...` to cmd_<cmd>(argc, argv)
 * with argv[0] == "<cmd>". Each returns the process exit status (0 success, 1 runtime error,
 * 2 usage error) and prints its own messages to stderr.
 */
#ifndef CM_COMMANDS_H
#define CM_COMMANDS_H

int cmd_convert(int argc, char **argv);
int cmd_complete(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_serve(int argc, char **argv);   /* server/serve.c */
int cmd_upcycle(int argc, char **argv); /* server/cmd_upcycle.c */
int cmd_quantize(int argc, char **argv); /* server/cmd_quantize.c */

#endif
