#!/usr/bin/env python3
# File 'testapp.cgi'
# Path of directory in which persistent sessions will be stored
SESSION_DIR = 'sessions'
# Module prefix of servlets
SERVLET_PREFIX = 'thisapp'
import sys
sys.path.insert(0, '../../lib')  # Make pyserv module importable
import pyserv
if __name__ == '__main__':
    pyserv.cgimain(SESSION_DIR, SERVLET_PREFIX)
