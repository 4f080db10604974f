#!/usr/bin/env python3
"""Hello world as a CGI script: the cost of starting the interpreter, and nothing else."""

import sys

sys.stdout.write("Content-Type: text/plain\r\n\r\nHello, world!\n")
