"""Reports of runs: plain data (`data`), inline-SVG HTML (`html`), PNG figures (`png`)."""
