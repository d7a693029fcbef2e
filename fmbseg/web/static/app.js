// The fmbseg demo page: send the image and class names, poll the job, show the result.
"use strict";

const POLL_MS = 300;
const $ = (id) => document.getElementById(id);
let samples = {};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function parseClasses(text) {
  return text.split(/[,\n]/).map((name) => name.trim()).filter((name) => name.length > 0);
}

function showPreview(url) {
  $("preview").hidden = !url;
  if (url) $("preview").src = url;
}

async function loadConfig() {
  const response = await fetch("/api/config");
  if (!response.ok) return showError(await errorText(response));
  const config = await response.json();
  $("model").value = config.model;
  for (const sample of config.samples) {
    samples[sample.name] = sample;
    $("sample").add(new Option(sample.name, sample.name));
  }
  $("sample").dataset.loaded = "true";
}

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) $("sample").value = "";
  showPreview(file ? URL.createObjectURL(file) : null);
});

$("sample").addEventListener("change", () => {
  const sample = samples[$("sample").value];
  if (!sample) return showPreview(null);
  $("file").value = "";
  showPreview(sample.url);
  if (!$("classes").value.trim()) $("classes").value = sample.classes.join(", ");
});

function showProgress(job) {
  $("progress").hidden = false;
  const steps = $("steps");
  steps.replaceChildren(
    ...job.steps.map((name, index) => {
      const item = document.createElement("li");
      item.textContent = name;
      if (index < job.step) item.className = "passed";
      if (index === job.step) item.className = job.state === "failed" ? "failed" : "current";
      return item;
    }),
  );
  const fraction = job.state === "done" ? 1 : job.step / job.steps.length;
  $("bar-fill").style.width = `${Math.round(100 * fraction)}%`;
  $("bar-fill").classList.toggle("failed", job.state === "failed");
  const seconds = job.elapsed_s.toFixed(1);
  $("status").textContent =
    job.state === "done" ? `done in ${seconds} s`
    : job.state === "failed" ? `failed after ${seconds} s`
    : `${job.state}… ${seconds} s`;
}

function showResult(result) {
  $("overlay").src = result.overlay_url;
  $("overlay").dataset.width = result.width;
  $("overlay").dataset.height = result.height;
  const rows = result.classes.map((area) => {
    const row = document.createElement("tr");
    row.dataset.index = area.index;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = area.color;
    const cells = [swatch, area.name, `${area.percent.toFixed(1)} %`].map((content) => {
      const cell = document.createElement("td");
      cell.append(content);
      return cell;
    });
    cells[1].className = "name";
    cells[2].className = "area";
    cells[2].dataset.percent = area.percent;
    row.append(...cells);
    return row;
  });
  $("legend").tBodies[0].replaceChildren(...rows);
  $("download").href = result.labels_url;
  $("download").download = result.download_name;
  $("result").hidden = false;
}

async function poll(jobId) {
  for (;;) {
    const response = await fetch(`/api/jobs/${jobId}`);
    if (!response.ok) return showError(await errorText(response));
    const job = await response.json();
    showProgress(job);
    if (job.state === "done") return showResult(job.result);
    if (job.state === "failed") return showError(job.error);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

$("request").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  $("result").hidden = true;
  $("empty").hidden = true;
  const query = new URLSearchParams({ model: $("model").value });
  for (const name of parseClasses($("classes").value)) query.append("classes", name);
  let body = null;
  const file = $("file").files[0];
  if ($("sample").value) query.set("sample", $("sample").value);
  else if (file) {
    query.set("filename", file.name);
    body = file;
  } else return showError("Upload an image or pick a sample.");
  if (!query.has("classes")) return showError("Type at least one class name.");
  $("submit").disabled = true;
  try {
    const response = await fetch(`/api/jobs?${query}`, {
      method: "POST",
      body,
      headers: { "Content-Type": "application/octet-stream" },
    });
    if (!response.ok) return showError(await errorText(response));
    const job = await response.json();
    showProgress(job);
    await poll(job.id);
  } catch (error) {
    showError(`request failed: ${error}`);
  } finally {
    $("submit").disabled = false;
  }
});

loadConfig();
