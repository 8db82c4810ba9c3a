import os
import sys

# Tests import their tiny-model factory as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
