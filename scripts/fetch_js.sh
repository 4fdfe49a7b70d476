#!/usr/bin/env bash
# Fetch the third-party JavaScript the site needs to work offline, from the npm registry, with `npm pack`.
#
#   scripts/fetch_js.sh [DEST]      (default DEST: _vendor; `make book` and `make test` call it)
#
# Writes DEST/npm/*.tgz (the packed tarballs) and DEST/site/third_party/... (what the site serves);
# _config.yml copies DEST/site into the built site via html_extra_path and points mathjax_path and
# nb_ipywidgets_js there. Nothing here is committed (_vendor/ is in .gitignore). The versions are
# pinned and each tarball's sha512 is checked against the value below, so a build is reproducible.
set -euo pipefail

dest=${1:-_vendor}
# package@version                           sha512 integrity of the tarball (as `npm pack --json` reports)
packages=(
  "mathjax@3.2.2                             sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
  "@jupyter-widgets/html-manager@1.0.15      sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA=="
  "requirejs@2.3.8                           sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw=="
)

stamp="$dest/.fetched"  # outside site/: html_extra_path copies dotfiles too
# Up to date when the same packages were unpacked by this same script (a change to it re-runs it).
want="$(printf '%s\n' "${packages[@]}" | awk '{print $1}') $(cksum <"${BASH_SOURCE[0]}")"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "fetch_js: $dest/site is up to date"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch_js: npm is needed (Debian: apt-get install -y npm)" >&2; exit 1; }

mkdir -p "$dest/npm"
rm -rf "$dest/site"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for entry in "${packages[@]}"; do
  read -r spec integrity <<<"$entry"
  name=${spec%@*}
  version=${spec##*@}
  tarball="$dest/npm/$(echo "${name#@}" | tr / -)-$version.tgz"
  if [[ ! -f $tarball ]]; then
    echo "fetch_js: npm pack $spec"
    (cd "$work" && npm pack --silent "$spec" >/dev/null)
    mv "$work/$(basename "$tarball")" "$tarball"
  fi
  got=$(python3 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")
  if [[ $got != "$integrity" ]]; then
    echo "fetch_js: $tarball has integrity $got, expected $integrity; delete it and retry" >&2
    exit 1
  fi
  mkdir -p "$work/$name"
  tar -xzf "$tarball" -C "$work/$name"
done

site="$dest/site/third_party"
mkdir -p "$site/mathjax" "$site/html-manager/dist" "$site/requirejs"
# MathJax: the whole es5 build (its components load extensions, fonts and the menu lazily by path).
cp -r "$work/mathjax/package/es5" "$site/mathjax/"
cp "$work/mathjax/package/LICENSE" "$site/mathjax/"
# ipywidgets' embedder for static pages (AMD build, loaded through RequireJS), with its fonts.
find "$work/@jupyter-widgets/html-manager/package/dist" -maxdepth 1 -type f ! -name '*.map' \
  -exec cp {} "$site/html-manager/dist/" \;
cp "$work/@jupyter-widgets/html-manager/package/package.json" "$site/html-manager/"  # BSD-3-Clause
# embed-amd.js resolves its icon fonts against the AMD ids of its modules ("@jupyter-widgets/...",
# by default relative to the page, which 404s). Map those ids to dist/, where the fonts are; this
# file is loaded after require.js and before embed-amd.js (nb_ipywidgets_js in _config.yml).
cat >"$site/html-manager/assets-path.js" <<'JS'
// Written by scripts/fetch_js.sh: the ipywidgets embedder's fonts are in dist/ next to this file.
(function () {
  var dist = new URL("dist", document.currentScript.src).href;
  require.config({paths: {"@jupyter-widgets": dist, "@jupyter-widgets/html-manager/dist": dist}});
  window.__jupyter_widgets_assets_path__ = dist + "/";
  // The embedder typesets widget labels through MathJax 2's MathJax.Hub.Queue; the book loads
  // MathJax 3, which has no Hub. Route those calls to MathJax 3's typesetPromise instead of letting
  // the embedder throw "Cannot read properties of undefined (reading 'Queue')".
  function hub() {
    if (window.MathJax && !window.MathJax.Hub) {
      window.MathJax.Hub = {Queue: function (job) {
        var el = job && job[2];
        if (el && window.MathJax.typesetPromise) { window.MathJax.typesetPromise([el]).catch(function () {}); }
      }};
    }
  }
  hub();
  document.addEventListener("DOMContentLoaded", hub);
})();
JS
cp "$work/requirejs/package/require.js" "$work/requirejs/package/package.json" "$site/requirejs/"  # MIT

echo "$want" >"$stamp"
echo "fetch_js: wrote $dest/site ($(du -sh "$dest/site" | cut -f1))"
