// Render every page of a built docs site in headless Chromium and report what a reader would see broken.
//
//   node tests/browser/check_site.mjs SITE_DIR SCREENSHOT_DIR > report.json
//
// For each SITE_DIR/**/*.html (from file://; not the top-level 404.html, which a web server
// shows at any missing path and so links site-absolute) it records:
//   katex_errors     text of each .katex-error element (KaTeX could not parse the source)
//   untypeset        count of .arithmatex elements KaTeX never rendered
//   stray_dollars    each "$" left in the rendered text outside code, pre and typeset math,
//                    with the words around it
//   console_errors   console.error messages and uncaught exceptions
//   failed_requests  requests that failed (a missing file, a blocked load)
//   broken_images    <img> elements that loaded no picture (naturalWidth == 0)
// and writes a full-page screenshot SCREENSHOT_DIR/<path with / as __>.png, and the seconds spent.
// The report is one JSON object on stdout: {"chromium": version, "pages": [{path, ...}, ...]}.
// tests/test_docs.py turns a non-empty list into a failure naming the page.

import { readdirSync, mkdirSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { pathToFileURL } from "node:url";
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [site, shots] = process.argv.slice(2);
if (!site || !shots) {
  console.error("usage: node check_site.mjs SITE_DIR SCREENSHOT_DIR");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

function htmlFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return htmlFiles(path);
    return entry.name.endsWith(".html") ? [path] : [];
  });
}

// Runs inside the page: everything the report lists, after KaTeX has had its chance.
function inspect() {
  const skip = "code, pre, script, style, textarea, .katex, .arithmatex";
  const stray = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.nodeValue;
    if (!text.includes("$") || node.parentElement.closest(skip)) continue;
    for (let i = text.indexOf("$"); i >= 0; i = text.indexOf("$", i + 1)) {
      stray.push(text.slice(Math.max(0, i - 40), i + 40).replace(/\s+/g, " ").trim());
    }
  }
  return {
    katex_errors: [...document.querySelectorAll(".katex-error")].map((e) => e.textContent.slice(0, 120)),
    untypeset: [...document.querySelectorAll(".arithmatex")].filter((e) => !e.querySelector(".katex")).length,
    stray_dollars: stray,
    broken_images: [...document.images].filter((img) => img.naturalWidth === 0).map((img) => img.getAttribute("src")),
  };
}

const browser = await puppeteer.launch({
  executablePath: await chromium.executablePath(),
  args: [...chromium.args, "--allow-file-access-from-files"],
  defaultViewport: { width: 1280, height: 900 },
  headless: true,
});
const pages = [];
try {
  const tab = await browser.newPage();
  let current;
  tab.on("console", (msg) => { if (msg.type() === "error") current.console_errors.push(msg.text()); });
  tab.on("pageerror", (err) => current.console_errors.push(String(err.message || err)));
  tab.on("requestfailed", (req) => current.failed_requests.push(`${req.url()} (${req.failure()?.errorText})`));
  for (const file of htmlFiles(site).sort()) {
    const path = relative(site, file).split(sep).join("/");
    if (path === "404.html") continue;
    current = { path, console_errors: [], failed_requests: [] };
    const t0 = Date.now();
    await tab.goto(pathToFileURL(file).href, { waitUntil: "load", timeout: 30000 });
    // KaTeX typesets from the theme's document$ observable, after load; wait for it (or give up).
    await tab.waitForFunction(
      () => [...document.querySelectorAll(".arithmatex")].every((e) => e.querySelector(".katex, .katex-error")),
      { timeout: 5000 },
    ).catch(() => {});
    Object.assign(current, await tab.evaluate(inspect));
    const t1 = Date.now();
    current.screenshot = join(shots, path.replace(/\//g, "__").replace(/\.html$/, ".png"));
    await tab.screenshot({ path: current.screenshot, fullPage: true, optimizeForSpeed: true });
    current.seconds = { render: (t1 - t0) / 1000, screenshot: (Date.now() - t1) / 1000 };
    pages.push(current);
  }
  console.log(JSON.stringify({ chromium: await browser.version(), pages }));
} finally {
  await browser.close();
}
