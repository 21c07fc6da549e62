"""`kubetune completion bash|zsh|fish`: print the shell completion script (argcomplete).

source <(kubetune completion bash)          # bash, e.g. in ~/.bashrc
source <(kubetune completion zsh)           # zsh, e.g. in ~/.zshrc
kubetune completion fish > ~/.config/fish/completions/kubetune.fish
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete in")


def run(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["kubetune"], shell=args.shell), end="")
    return 0
