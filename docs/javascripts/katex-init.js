// Typeset the math that pymdownx.arithmatex (generic mode) marked, <span class="arithmatex">\(…\)</span>
// and <div class="arithmatex">\[…\]</div>, with the vendored KaTeX. Only those elements: a "$" anywhere
// else stays a "$", so a formula Markdown did not recognise (a $$ block inside a paragraph, a list item
// not indented by four spaces) shows on the page and fails tests/test_docs.py, instead of pairing with
// another "$" across the prose and setting the words between them as math.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
