"""Screenshot of a trajectory view (README figure), with headless Chromium.

    python scripts/screenshot_view.py trajectories.html docs/figures/trajectory_view.png

The README's figure was made from the validation samples of `scripts/screen_val.py
'{"n_test": 500, "seed": 1}' dump.pkl`, rendered with
`metastone_lab.trajectory_view.write_html(samples, "view.html", tokenizer, max_problems=40)`."""
import shutil
import subprocess
import sys
from pathlib import Path

src, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
chromium = shutil.which("chromium") or shutil.which("chromium-browser")
if chromium is None:
    sys.exit("Chromium is not installed (Debian: apt-get install chromium)")
subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--window-size=1400,1000", f"--screenshot={out}", src.as_uri()], check=True,
               capture_output=True)
print(out, out.stat().st_size)
