"""Download Paul Graham's essays into PaulGrahamEssays.json, the essay haystack of RULER's niah tasks.

    python eval/ruler/data/synthetic/json/download_paulgraham_essay.py

Fetches the essays listed in PaulGrahamEssays_URLs.txt (next to this script; RULER's list: the
.txt copies in gkamradt/LLMTest_NeedleInAHaystack and the rest from paulgraham.com), converts the
HTML pages to text as RULER does (BeautifulSoup's first <font> tag through html2text), and writes
{"text": all essays concatenated} next to this script, whatever the working folder. Needs network
access and ``pip install beautifulsoup4 html2text``. prepare.py's --essay_file takes any file of
this format instead.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
URLS = os.path.join(HERE, "PaulGrahamEssays_URLs.txt")
OUTPUT = os.path.join(HERE, "PaulGrahamEssays.json")


def main() -> int:
    try:
        import html2text
        from bs4 import BeautifulSoup
    except ImportError as exc:
        print(f"error: this script needs {exc.name}: pip install beautifulsoup4 html2text", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(items):
            return items

    converter = html2text.HTML2Text()
    converter.ignore_images = True
    converter.ignore_tables = True
    converter.escape_all = True
    converter.reference_links = False
    converter.mark_code = False

    with open(URLS, encoding="utf-8") as f:
        urls = [line.strip() for line in f if line.strip()]

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        from_repo, from_html = os.path.join(tmp, "essay_repo"), os.path.join(tmp, "essay_html")
        os.makedirs(from_repo)
        os.makedirs(from_html)
        for url in tqdm(urls):
            try:
                with urllib.request.urlopen(url, timeout=60) as page:
                    raw = page.read()
                if ".html" in url:
                    name = url.split("/")[-1].replace(".html", ".txt")
                    # RULER decodes the pages with "unicode_escape"; kept so the text matches its file
                    soup = BeautifulSoup(raw.decode("unicode_escape", "utf-8"), "html.parser")
                    text, folder = converter.handle(str(soup.find("font"))), from_html
                else:
                    name, text, folder = url.split("/")[-1], raw.decode("utf-8"), from_repo
                with open(os.path.join(folder, name), "w", encoding="utf-8") as out:
                    out.write(text)
            except Exception as exc:  # noqa: BLE001 -- one essay failing must not stop the others
                failed += 1
                print(f"Fail download {url} ({exc})", file=sys.stderr)

        repo_files = sorted(glob.glob(os.path.join(from_repo, "*.txt")))
        html_files = sorted(glob.glob(os.path.join(from_html, "*.txt")))
        print(f"Downloaded {len(repo_files)} essays from https://github.com/gkamradt/LLMTest_NeedleInAHaystack/")
        print(f"Downloaded {len(html_files)} essays from http://www.paulgraham.com/")
        if not repo_files and not html_files:
            print("error: no essay could be downloaded (network access?)", file=sys.stderr)
            return 2
        text = ""
        for path in repo_files + html_files:
            with open(path, encoding="utf-8") as f:
                text += f.read()

    partial = OUTPUT + ".part"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"text": text}, f)
    os.replace(partial, OUTPUT)
    print(f"wrote {OUTPUT} ({len(text)} characters{f'; {failed} essays failed' if failed else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
