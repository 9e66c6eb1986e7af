// MathJax 3 settings for pymdownx.arithmatex (generic mode), as mkdocs-material documents them:
// only elements of class "arithmatex" are typeset. The notebooks' Markdown cells (mkdocs-jupyter)
// hold plain $...$ and $$...$$ in their paragraphs, so those paragraphs are marked "nb-math" first.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|nb-math"
  }
};

function markNotebookMath() {
  const cells = ".jp-RenderedMarkdown p, .jp-RenderedMarkdown li, .jp-RenderedMarkdown td"
  document.querySelectorAll(cells).forEach(e => e.classList.add("nb-math"))
}

markNotebookMath()

document$.subscribe(() => {
  markNotebookMath()
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
