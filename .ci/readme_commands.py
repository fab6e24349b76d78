"""Print the README's two set-up commands (the ```bash blocks under
"## Set up"), each followed by a NUL; fail unless there are exactly two."""
import re
import sys
from pathlib import Path

text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
m = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.M | re.S)
blocks = re.findall(r"^```bash\n(.*?)^```", m[1] if m else "", re.M | re.S)
if len(blocks) != 2:
    sys.exit(f"README.md: {len(blocks)} bash blocks under '## Set up', expected 2")
sys.stdout.write("".join(b.strip() + "\0" for b in blocks))
