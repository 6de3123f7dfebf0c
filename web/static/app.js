// Progressive enhancement only: every page works without this file, minus previews and live progress.
"use strict";

function previewChosenImage() {
  const input = document.getElementById("image");
  const drop = document.getElementById("drop");
  const preview = document.getElementById("preview");
  if (!input || !drop || !preview) return;
  const show = () => {
    const file = input.files && input.files[0];
    if (!file) return;
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
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

const FINISHED = ["done", "failed", "partial"];

// Polls a job's JSON a few times a second, backing off, until it is finished; then the page is rendered anew.
async function follow(url, onUpdate) {
  let delay = 50;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 1.5, 2000);
    let job;
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
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
  follow(page.dataset.statusUrl, (job) => {
    if (bar) showProgress(bar, job);
    if (waiting) waiting.hidden = !(job.state === "queued" && Date.now() - started > 10000);
  }).then((job) => { if (job) window.location.reload(); });
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
