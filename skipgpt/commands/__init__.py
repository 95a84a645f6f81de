"""One module per `skipgpt` subcommand; see skipgpt/cli.py."""
