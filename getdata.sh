#!/usr/bin/env bash
# Download the language-modelling corpora and prepare them under data/ with prepare.py.
#
#   ./getdata.sh [enwik8|text8|wikitext-2|wikitext-103|ptb|all]     (default: all)
#
# Each corpus is skipped when its data/NAME/train.txt exists. Archives are kept in data/,
# so an interrupted run picks up where it stopped. Environment: PYTHON (default: python),
# and ENWIK8_URL, TEXT8_URL, WIKITEXT_URL (the folder of the WikiText zips), PTB_URL.
set -euo pipefail

cd "$(dirname "$0")"
PYTHON="${PYTHON:-python}"
ENWIK8_URL="${ENWIK8_URL:-http://mattmahoney.net/dc/enwik8.zip}"
TEXT8_URL="${TEXT8_URL:-http://mattmahoney.net/dc/text8.zip}"
WIKITEXT_URL="${WIKITEXT_URL:-https://wikitext.smerity.com}"
PTB_URL="${PTB_URL:-http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz}"

usage() {
    echo "usage: ./getdata.sh [enwik8|text8|wikitext-2|wikitext-103|ptb|all]" >&2
    exit 2
}

# download URL FILE: fetch URL into FILE, through FILE.part so that FILE is always complete.
download() {
    local url="$1" file="$2"
    if [[ -f "$file" ]]; then
        return
    fi
    echo "downloading $url"
    local ok=0
    if command -v curl >/dev/null; then
        curl -fL --retry 3 -o "$file.part" "$url" && ok=1
    elif command -v wget >/dev/null; then
        wget --tries=3 -O "$file.part" "$url" && ok=1
    else
        echo "getdata.sh: curl or wget is needed to download $url" >&2
        exit 1
    fi
    if [[ "$ok" != 1 ]]; then
        rm -f "$file.part"
        echo "could not download $url: check the network" >&2
        exit 1
    fi
    mv "$file.part" "$file"
}

# get NAME URL ARCHIVE OUTDIR: download data/ARCHIVE and prepare data/OUTDIR from it with
# `prepare.py NAME`, unless data/OUTDIR/train.txt exists (prepare.py writes it last).
get() {
    local name="$1" url="$2" archive="data/$3" outdir="data/$4"
    if [[ -f "$outdir/train.txt" ]]; then
        echo "$outdir/train.txt exists: skipped"
        return
    fi
    download "$url" "$archive"
    echo "preparing $outdir"
    "$PYTHON" prepare.py "$name" "$archive" "$outdir"
}

get_enwik8() {
    echo "== enwik8 (byte level)"
    get enwik8 "$ENWIK8_URL" enwik8.zip enwik8
}

get_text8() {
    echo "== text8 (character level)"
    get text8 "$TEXT8_URL" text8.zip text8
}

get_wikitext() {  # $1: 2 or 103
    echo "== WikiText-$1 (word level)"
    get wikitext "$WIKITEXT_URL/wikitext-$1-v1.zip" "wikitext-$1-v1.zip" "wikitext-$1"
    echo "== WikiText-$1 raw (character level)"
    get wikitext "$WIKITEXT_URL/wikitext-$1-raw-v1.zip" "wikitext-$1-raw-v1.zip" "wikitext-$1-raw"
}

get_ptb() {
    echo "== Penn Treebank (word level)"
    get ptb "$PTB_URL" simple-examples.tgz penn
    echo "== Penn Treebank (character level)"
    get ptbchar "$PTB_URL" simple-examples.tgz pennchar
}

if [[ $# -gt 1 ]]; then
    usage
fi
mkdir -p data
case "${1:-all}" in
    enwik8) get_enwik8 ;;
    text8) get_text8 ;;
    wikitext-2) get_wikitext 2 ;;
    wikitext-103) get_wikitext 103 ;;
    ptb) get_ptb ;;
    all)
        get_enwik8
        get_text8
        get_wikitext 2
        get_wikitext 103
        get_ptb
        ;;
    *) usage ;;
esac
