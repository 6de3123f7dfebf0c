// Progressive enhancement only: every page works without this file, minus previews and live progress.
"use strict";

function previewChosenImage() {
  const input = document.getElementById("image");
  const drop = document.getElementById("drop");
  const area = document.getElementById("crop-area");
  const preview = document.getElementById("preview");
  if (!input || !drop || !area || !preview) return;
  const cropper = drawCropBox(preview);
  const show = () => {
    const file = input.files && input.files[0];
    if (!file) return;
    cropper.clear();
    preview.src = URL.createObjectURL(file);
    area.hidden = false;
  };
  input.addEventListener("change", show);
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      show();
    }
  });
}

// A box dragged on the preview becomes the form's `crop=x,y,w,h`, in pixels of the photo as shown (naturalWidth and
// naturalHeight are after its EXIF orientation, as the server counts them).
function drawCropBox(preview) {
  const box = document.getElementById("crop-box");
  const field = document.getElementById("crop");
  const clearButton = document.getElementById("crop-clear");
  let start = null;
  const clamp = (value, low, high) => Math.min(Math.max(value, low), high);
  const at = (event) => {
    const rect = preview.getBoundingClientRect();
    return { x: clamp(event.clientX - rect.left, 0, rect.width), y: clamp(event.clientY - rect.top, 0, rect.height) };
  };
  const place = (a, b) => {
    Object.assign(box.style, {
      left: `${Math.min(a.x, b.x)}px`, top: `${Math.min(a.y, b.y)}px`,
      width: `${Math.abs(a.x - b.x)}px`, height: `${Math.abs(a.y - b.y)}px`,
    });
    box.hidden = false;
  };
  const clear = () => {
    field.value = "";
    box.hidden = true;
    clearButton.hidden = true;
  };
  const finish = (end) => {
    const rect = preview.getBoundingClientRect();
    const scaleX = preview.naturalWidth / rect.width;
    const scaleY = preview.naturalHeight / rect.height;
    const left = Math.round(Math.min(start.x, end.x) * scaleX);
    const top = Math.round(Math.min(start.y, end.y) * scaleY);
    const width = Math.round(Math.max(start.x, end.x) * scaleX) - left;
    const height = Math.round(Math.max(start.y, end.y) * scaleY) - top;
    start = null;
    if (width < 1 || height < 1) return clear();  // a click, not a box: the whole photo
    field.value = `${left},${top},${width},${height}`;
    clearButton.hidden = false;
  };
  preview.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    preview.setPointerCapture(event.pointerId);
    start = at(event);
  });
  preview.addEventListener("pointermove", (event) => { if (start) place(start, at(event)); });
  preview.addEventListener("pointerup", (event) => { if (start) finish(at(event)); });
  preview.addEventListener("pointercancel", () => { if (start) { start = null; clear(); } });
  clearButton.addEventListener("click", clear);
  return { clear };
}

const FINISHED = ["done", "failed", "partial"];
const SEARCH_WAIT_SECONDS = 10;  // the server's cap (`wait` of GET /api/jobs/<id>)

// Follows a job's JSON until it is finished; then the page is rendered anew. With `wait` (seconds), each request
// waits on the server for the job to finish (a search); without, or when the server had no thread to wait with, it
// asks again a few times a second, backing off (a load's progress).
async function follow(url, onUpdate, wait = 0) {
  const asked = wait ? `${url}${url.includes("?") ? "&" : "?"}wait=${wait}` : url;
  let delay = wait ? 0 : 50;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(Math.max(delay * 1.5, 50), 2000);
    let job;
    try {
      const response = await fetch(asked, { headers: { Accept: "application/json" } });
      if (response.status === 404) return null;  // expired or never existed: nothing more to wait for
      if (!response.ok) continue;
      job = await response.json();
    } catch (error) {
      continue;  // the server or the network blinked: try again later
    }
    onUpdate(job);
    if (FINISHED.includes(job.state)) return job;
  }
}

function showProgress(element, job) {
  const p = job.progress;
  const finished = p.done + p.failed;
  const percent = p.total ? Math.floor((100 * finished) / p.total) : (FINISHED.includes(job.state) ? 100 : 0);
  element.querySelector("progress").value = percent;
  element.querySelector(".percent").textContent = `${percent} %`;
  element.querySelector(".done").textContent = p.done.toLocaleString("en");
  element.querySelector(".failed").textContent = p.failed.toLocaleString("en");
  element.querySelector(".total").textContent = p.total === null ? "?" : p.total.toLocaleString("en");
  element.querySelector(".state").textContent = job.state;
  element.dataset.state = job.state;
}

function followJobPage() {
  const page = document.querySelector(".job[data-job]");
  if (!page || FINISHED.includes(page.dataset.state)) return;
  const started = Date.now();
  const waiting = page.querySelector(".waiting");
  const bar = page.querySelector(".progress");
  const wait = page.dataset.kind === "search" ? SEARCH_WAIT_SECONDS : 0;  // a load shows its progress as it goes
  follow(page.dataset.statusUrl, (job) => {
    if (bar) showProgress(bar, job);
    if (waiting) waiting.hidden = !(job.state === "queued" && Date.now() - started > 10000);
  }, wait).then((job) => { if (job) window.location.reload(); });
}

function followLoads() {
  const bars = document.querySelectorAll(".loads .progress[data-job]");
  const running = [...bars].filter((bar) => !FINISHED.includes(bar.dataset.state));
  for (const bar of running) {
    follow(`/api/jobs/${bar.dataset.job}?errors_limit=0`, (job) => showProgress(bar, job));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  previewChosenImage();
  followJobPage();
  followLoads();
});
