// Drives the web console in a real headless Chromium (@sparticuz/chromium's binary, shipped in
// the npm package: nothing is downloaded) with puppeteer-core, as a new user would: sign in,
// upload a bad dataset (row errors shown per row) and a good one, build an evaluator by
// clicking (an error at its JSON path, then valid), create a GRPO job, watch it reach SUCCEEDED
// with its reward curve drawn, answer a review, and check labels and a narrow window.
// Usage: node console_flow.mjs CONSOLE_URL API_KEY GOOD_JSONL BAD_JSONL SCREENSHOT_DIR
// Prints one JSON line of findings; tests/console/test_browser.py asserts on it.
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [url, apiKey, goodFile, badFile, shots] = process.argv.slice(2);
const JOB_TIMEOUT_MS = 420_000;
const out = {};

const browser = await puppeteer.launch({
  // A plain language tag: the default here (en-US@posix, from the C locale) is one Intl refuses.
  args: [...chromium.args, "--lang=en-US"],
  executablePath: await chromium.executablePath(),
  headless: true,
  defaultViewport: { width: 1280, height: 900 },
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // Sign in with the team's key.
  await page.goto(`${url}/login`);
  await page.type("#api_key", apiKey);
  await Promise.all([page.waitForNavigation(), page.click("main button[type=submit]")]);
  out.after_login = new URL(page.url()).pathname;

  // Upload: a file with a bad row, then a good one.
  async function upload(name, file) {
    await page.goto(`${url}/datasets`);
    await page.type("#upload-name", name);
    await page.select("#upload-kind", "prompt");
    await (await page.$("#upload-file")).uploadFile(file);
    await page.click("#upload-form button[type=submit]");
    await page.waitForSelector("#upload-result .ok, #upload-result .error");
  }
  await upload("broken", badFile);
  out.row_errors = await page.$$eval("#row-errors tbody tr", (rows) =>
    rows.map((r) => ({ row: Number(r.dataset.row), cells: [...r.cells].map((c) => c.textContent.trim()) })));
  await upload("arith", goodFile);
  out.uploaded = await page.$eval("#upload-result .ok", (e) => e.textContent.trim());
  await page.goto(`${url}/datasets`);
  out.prompt_rows = await page.$$eval("#kind-prompt + .scroll tbody tr", (rows) =>
    rows.map((r) => [r.cells[0].textContent.trim(), r.cells[2].dataset.rows]));

  // Create a job: GRPO is the default method.
  await page.goto(`${url}/jobs/new?method=METHOD_GRPO`);
  out.data_notice_grpo = await page.$eval("#data-notice", (e) => e.textContent.trim());
  await page.click("button[data-add-scorer=regex]");
  const pattern = "#scorers fieldset.scorer input[data-path='regex.pattern']";
  await page.type(pattern, "(");
  await page.waitForSelector("#evaluator-errors li[data-path='scorers[0].regex.pattern']");
  out.pattern_error = await page.$eval(`${pattern}`, (e) =>
    [e.getAttribute("aria-invalid"), document.getElementById(`${e.id}-err`).textContent]);
  await page.$eval(pattern, (e) => { e.value = ""; });
  await page.type(pattern, "[0-9]");
  await page.waitForSelector("#evaluator-normalized");
  await page.waitForFunction(() => {
    const shown = document.getElementById("evaluator-normalized");
    return shown && JSON.parse(document.getElementById("evaluator-json").value).scorers[0].regex.pattern === "[0-9]";
  });
  out.built_json = await page.$eval("#evaluator-json-view", (e) => e.textContent);
  out.normalized_shown = await page.$eval("#evaluator-normalized", (e) => e.textContent);
  await page.type("#f-evaluator_name", "digits");
  await page.click("input[name=tuning][value=full]");
  await page.$eval("#params-section", (d) => { d.open = true; });
  const params = {
    "training.max_steps": "3", "training.per_device_batch_size": "8",
    "training.learning_rate": "0.01", "training.seed": "1", "training.log_every": "1",
    "grpo.num_generations": "8", "grpo.sampling.max_tokens": "6", "grpo.sampling.seed": "1",
  };
  for (const [path, value] of Object.entries(params)) {
    await page.type(`#f-${path.replaceAll(".", "-")}`, value);
  }
  // A wrong value is shown next to its field (validate_only), then corrected.
  await page.type("#f-grpo-beta", "-1");
  await page.click("xpath/.//button[normalize-space()='Check']");
  await page.waitForFunction(() => document.getElementById("err-f-grpo-beta").textContent !== "");
  out.beta_error = await page.$eval("#err-f-grpo-beta", (e) => e.textContent);
  await page.$eval("#f-grpo-beta", (e) => { e.value = ""; });
  await page.click("xpath/.//button[normalize-space()='Check']");
  await page.waitForFunction(() => document.getElementById("err-f-grpo-beta").textContent === "");
  out.checked = await page.$eval("#check-result", (e) => e.textContent.trim());
  await page.click("#estimate-button");
  await page.waitForSelector("#estimate-table");
  out.estimate = await page.$eval("#estimate-fits", (e) => e.textContent.trim());
  await page.screenshot({ path: `${shots}/console-create-job.png`, fullPage: true });

  // Labels: every visible input of the create page is named.
  out.unlabeled = await page.$$eval("input:not([type=hidden]), select, textarea", (els) =>
    els.filter((e) => e.offsetParent !== null && e.labels.length === 0 && !e.getAttribute("aria-label"))
      .map((e) => e.id || e.name || e.outerHTML.slice(0, 80)));

  await Promise.all([page.waitForNavigation(), page.click("#job-form button[type=submit]")]);
  out.job_path = new URL(page.url()).pathname;
  await page.waitForFunction(() => document.body.dataset.jobDone === "true", { timeout: JOB_TIMEOUT_MS });
  await page.waitForFunction(() => document.getElementById("job-output").textContent.includes("revisions/"));
  out.state = await page.$eval("#job-state", (e) => e.textContent.trim());
  out.output = await page.$eval("#job-output", (e) => e.textContent.trim());
  out.reward_curve = await page.evaluate(() => {
    const c = window.tlmCurves.reward_mean;
    const canvas = document.querySelector("#curve-reward_mean canvas");
    return c && { steps: c.steps, values: c.values, canvas: canvas ? [canvas.width, canvas.height] : null };
  });
  out.samples = await page.$$eval("#samples tbody tr", (rows) => rows.length);
  await page.screenshot({ path: `${shots}/console-job.png`, fullPage: true });

  // The review queue: pick the better completion.
  await page.goto(`${url}/reviews`);
  out.reviews_before = await page.$$eval("article.review", (els) => els.map((e) => e.id));
  await page.click("article.review button[name=chosen_index][value='1']");
  await page.waitForSelector("article.review .ok");
  out.review_answer = await page.$eval("article.review .ok", (e) => e.textContent.trim());

  // Model square: the trained revision under its base, with the job that made it.
  await page.goto(`${url}/models`);
  out.lineage = await page.$$eval("#lineage .tree .tree .node", (els) => els.map((e) => e.textContent.replace(/\s+/g, " ").trim()));

  // A narrow window: nothing wider than the screen but scrollable tables.
  await page.setViewport({ width: 380, height: 800 });
  out.narrow = {};
  for (const path of ["/models", "/datasets", "/jobs/new", "/jobs", "/reviews"]) {
    await page.goto(`${url}${path}`);
    out.narrow[path] = await page.evaluate(() => document.documentElement.scrollWidth);
  }
  out.page_errors = errors;
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
  console.log(JSON.stringify(out));
}
