"""Compare two benchmark results: python bench/compare.py OLD.json NEW.json

The same as `python -m lstm_fused.bench compare OLD.json NEW.json`: per case in both files,
our time new/old, torch's time new/old and the change of the speed-up; exit 2 on malformed
input.
"""
import sys

from lstm_fused.bench import compare_main

if __name__ == "__main__":
    sys.exit(compare_main(sys.argv[1:]))
