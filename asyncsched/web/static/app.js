// The asyncsched dashboard: plain JavaScript, no build step.
//
// Data comes from the JSON API next to this page (api/...). Live updates come from api/events, read with
// fetch() rather than EventSource so that the Authorization header can be sent: the token never appears
// in a URL. Every value from the server is put in the page with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "asyncsched.token";
const FINAL = ["completed", "failed", "timed_out", "crashed", "cancelled"];
const MESSAGES_SHOWN = 5;
const LIVE_CARDS = 6;
const RESULTS_PAGE = 50;
const BATCHES_PAGE = 100;
const RECONNECT_MS = 1000;
const REFRESH_MS = 3000;
const RESULTS_DELAY_MS = 1000; // re-read running batches that this page did not see start

const $ = (selector) => document.querySelector(selector);

const state = {
  batches: new Map(), // batch_id -> summary from the API, with live counts: the page shown and the live cards
  pageIds: [], // the batches of the page shown, newest first
  live: [], // batch ids shown as cards, newest first
  messages: new Map(), // batch_id -> latest task messages
  lastTimestamp: new Map(), // batch_id -> server time of its latest event
  selected: null,
  offset: 0,
  shown: 0, // results on the page shown: the next page starts after them
  batchOffset: 0, // the batches shown start after this many newer ones
  batchTotal: 0,
  started: false,
  following: false, // the event stream is followed: false again once it is refused a token
};

class Unauthorized extends Error {}

// -- the API ----------------------------------------------------------------------------------

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(`api/${path}`, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    askForToken(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused: enter it again." : null);
    throw new Unauthorized();
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const known = body.tasks ? ` (known tasks: ${body.tasks.join(", ") || "none"})` : "";
    throw new Error((body.error || `${response.status} ${response.statusText}`) + known);
  }
  return body;
}

function askForToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  const text = $("#token-message");
  if (message) {
    text.textContent = message;
    text.classList.add("error");
  }
  $("#token-form").hidden = false;
  $("#token-input").focus();
}

// -- live events ------------------------------------------------------------------------------

async function follow() {
  let lastId = null;
  for (;;) {
    try {
      const extra = { Accept: "text/event-stream" };
      if (lastId) extra["Last-Event-ID"] = lastId;
      const response = await fetch("api/events", { headers: headers(extra), cache: "no-store" });
      if (response.status === 401) {
        state.following = false; // start() follows it again with the next token
        askForToken(null);
        return;
      }
      if (!response.ok || !response.body) throw new Error(`events: ${response.status}`);
      setConnection(true);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event.id) lastId = event.id;
          if (event.data !== null) dispatch(event.type, JSON.parse(event.data));
        }
      }
    } catch (error) {
      console.warn("event stream:", error);
    }
    setConnection(false);
    await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
  }
}

function parseEvent(block) {
  const event = { id: null, type: "message", data: null };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = value;
    else if (field === "event") event.type = value;
    else if (field === "data") event.data = event.data === null ? value : `${event.data}\n${value}`;
  }
  return event;
}

function setConnection(live) {
  const badge = $("#connection");
  badge.dataset.state = live ? "live" : "offline";
  badge.textContent = live ? "live" : "reconnecting";
}

function dispatch(type, data) {
  if (type === "reset") {
    refreshBatches();
  } else if (type === "batch") {
    if (data.state === "running") showLive(data.batch_id);
    refreshBatches().then(() => {
      if (data.state === "finished" && data.batch_id === state.selected) loadResults();
    });
  } else if (type === "task") {
    onTaskEvent(data);
  }
}

function onTaskEvent(event) {
  const id = event.batch_id;
  state.lastTimestamp.set(id, event.timestamp);
  if (event.type === "reported" && event.message !== null) {
    const messages = state.messages.get(id) || [];
    messages.unshift(`${event.key}: ${event.message}`);
    state.messages.set(id, messages.slice(0, MESSAGES_SHOWN));
  }
  const batch = state.batches.get(id);
  if (!batch) {
    showLive(id);
    refreshBatches();
    return;
  }
  if (event.type === "finished" && batch.state === "running") {
    batch.total += 1;
    batch[event.status] = (batch[event.status] || 0) + 1;
    batch.success_rate = batch.total ? batch.completed / batch.total : 0;
    if (id === state.selected) scheduleResults();
  }
  scheduleRender();
}

// -- batches ----------------------------------------------------------------------------------

let refreshing = null;

function refreshBatches() {
  // One request at a time; a request asked for meanwhile runs once after it.
  if (refreshing) {
    refreshing.again = true;
    return refreshing.promise;
  }
  const run = async () => {
    do {
      refreshing.again = false;
      try {
        const page = await api(`batches?limit=${BATCHES_PAGE}&offset=${state.batchOffset}`);
        const known = new Map(page.batches.map((batch) => [batch.batch_id, batch]));
        for (const batch of page.batches) if (batch.state === "running") showLive(batch.batch_id);
        for (const id of state.live.filter((live) => !known.has(live))) {
          // a card's batch on another page than the one shown: read on its own
          const batch = await api(`batches/${encodeURIComponent(id)}`).catch((error) => {
            if (error instanceof Unauthorized) throw error;
            return null; // gone: no card
          });
          if (batch) known.set(id, batch);
        }
        state.batches = known;
        state.pageIds = page.batches.map((batch) => batch.batch_id);
        state.batchTotal = page.total;
      } catch (error) {
        if (!(error instanceof Unauthorized)) console.warn("batches:", error);
      }
    } while (refreshing.again);
    refreshing = null;
    render();
  };
  refreshing = { again: false };
  refreshing.promise = run();
  return refreshing.promise;
}

function showLive(batchId) {
  if (state.live.includes(batchId)) return;
  state.live.unshift(batchId);
  state.live.length = Math.min(state.live.length, LIVE_CARDS);
}

let renderPending = false;
let resultsTimer = null;

function scheduleResults() {
  // The selected batch's results, re-read at most every RESULTS_DELAY_MS while it runs.
  if (resultsTimer === null) {
    resultsTimer = setTimeout(() => {
      resultsTimer = null;
      loadResults();
    }, RESULTS_DELAY_MS);
  }
}

function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  renderLive();
  renderBatches();
}

function renderLive() {
  const container = $("#live");
  const cards = state.live.filter((id) => state.batches.has(id));
  $("#live-empty").hidden = cards.length > 0;
  for (const element of [...container.children]) {
    if (!cards.includes(element.dataset.batchId)) element.remove();
  }
  cards.forEach((id, position) => {
    let card = container.querySelector(`[data-batch-id="${CSS.escape(id)}"]`);
    if (!card) {
      card = $("#card-template").content.firstElementChild.cloneNode(true);
      card.dataset.batchId = id;
      card.querySelector(".cancel").addEventListener("click", () => cancelBatch(id));
    }
    if (container.children[position] !== card) container.insertBefore(card, container.children[position] || null);
    fillCard(card, state.batches.get(id));
  });
}

function fillCard(card, batch) {
  const running = batch.state === "running";
  const expected = running ? batch.expected : batch.total;
  const done = Math.min(batch.total, expected ?? batch.total);
  const percent = expected ? Math.floor((100 * done) / expected) : running ? 0 : 100;
  card.dataset.state = batch.state;
  card.querySelector(".card-title").textContent = batch.name ? `${batch.name} · ${batch.batch_id}` : batch.batch_id;
  card.querySelector(".card-state").textContent = batch.state;
  card.querySelector(".cancel").hidden = !running;
  const bar = card.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(percent));
  bar.querySelector(".bar-fill").style.width = `${percent}%`;
  card.querySelector(".percent").textContent = expected || !running ? `${percent}%` : "—";
  card.querySelector(".done").textContent = `${done}/${expected ?? "?"}`;
  card.querySelector(".eta").textContent = running ? `ETA ${eta(batch, done, expected)}` : took(batch);
  card.querySelector(".success").textContent = percentOf(batch.success_rate);
  card.querySelector(".counts").textContent = FINAL.map((s) => `${s.replace("_", " ")} ${batch[s] || 0}`).join(" · ");
  const list = card.querySelector(".messages");
  list.replaceChildren(...(state.messages.get(batch.batch_id) || []).map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
}

function eta(batch, done, expected) {
  const now = state.lastTimestamp.get(batch.batch_id);
  if (!expected || !done || !now) return "—";
  return seconds(((now - batch.created_at) / done) * (expected - done));
}

function took(batch) {
  return batch.elapsed === null ? "ended" : `took ${seconds(batch.elapsed)}`;
}

function seconds(value) {
  return value < 90 ? `${Math.round(value * 10) / 10}s` : `${Math.round(value / 60)}min`;
}

function percentOf(rate) {
  return `${Math.round(rate * 1000) / 10}%`;
}

function renderBatches() {
  const body = $("#batches tbody");
  const rows = state.pageIds.map((id) => state.batches.get(id)).map((batch) => {
    const row = document.createElement("tr");
    row.dataset.batchId = batch.batch_id;
    row.classList.toggle("selected", batch.batch_id === state.selected);
    const cells = [batch.batch_id, batch.name ?? "", batch.state,
      batch.expected ? `${batch.total}/${batch.expected}` : String(batch.total),
      ...FINAL.map((status) => String(batch[status])), percentOf(batch.success_rate),
      new Date(batch.created_at * 1000).toLocaleString()];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    row.addEventListener("click", () => selectBatch(batch.batch_id));
    return row;
  });
  body.replaceChildren(...rows);
  const last = state.batchOffset + rows.length;
  $("#batches-pager").hidden = state.batchTotal <= BATCHES_PAGE && state.batchOffset === 0;
  $("#batches-range").textContent = rows.length ? `${state.batchOffset + 1}–${last} of ${state.batchTotal}` : "none";
  $("#batches-newer").disabled = state.batchOffset === 0;
  $("#batches-older").disabled = last >= state.batchTotal;
}

async function cancelBatch(batchId) {
  try {
    await api(`batches/${encodeURIComponent(batchId)}`, { method: "DELETE" });
  } catch (error) {
    if (!(error instanceof Unauthorized)) alertStatus(error.message, true);
  }
  await refreshBatches();
  if (batchId === state.selected) loadResults();
}

// -- results ----------------------------------------------------------------------------------

function selectBatch(batchId) {
  state.selected = batchId;
  state.offset = 0;
  $("#results-panel").hidden = false;
  $("#results-batch").textContent = batchId;
  renderBatches();
  loadResults();
}

async function loadResults() {
  const batchId = state.selected;
  if (!batchId) return;
  const status = $("#results-status").value;
  const query = new URLSearchParams({ limit: String(RESULTS_PAGE), offset: String(state.offset) });
  if (status) query.set("status", status);
  let page;
  try {
    page = await api(`batches/${encodeURIComponent(batchId)}/results?${query}`);
  } catch (error) {
    if (!(error instanceof Unauthorized)) console.warn("results:", error);
    return;
  }
  if (batchId !== state.selected) return;
  const rows = page.results.map((result) => {
    const row = document.createElement("tr");
    row.dataset.key = result.key;
    row.dataset.status = result.status;
    const shown = result.status === "completed" ? JSON.stringify(result.value) : result.error ?? "";
    const cells = [result.key, result.status, shown, result.message ?? "", String(result.attempts),
      String(result.pid ?? ""), result.duration === null ? "" : `${result.duration.toFixed(3)}s`];
    cells.forEach((text, index) => {
      const cell = document.createElement("td");
      cell.textContent = text;
      if (index === 1) cell.className = `status-${result.status}`;
      row.append(cell);
    });
    return row;
  });
  $("#results tbody").replaceChildren(...rows);
  state.shown = page.results.length;
  const last = Math.min(page.offset + page.results.length, page.total); // a page of big values ends early
  $("#results-range").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "none";
  $("#results-prev").disabled = page.offset === 0;
  $("#results-next").disabled = last >= page.total;
}

// -- submitting -------------------------------------------------------------------------------

function alertStatus(text, isError) {
  const status = $("#submit-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function submitBatch(event) {
  event.preventDefault();
  let inputs;
  try {
    inputs = JSON.parse($("#inputs").value);
  } catch (error) {
    alertStatus(`Inputs are not JSON: ${error.message}`, true);
    return;
  }
  const body = { task: $("#task-select").value, inputs };
  const timeout = $("#timeout").value;
  const retries = $("#retries").value;
  if (timeout) body.timeout = Number(timeout);
  if (retries) body.retries = Number(retries);
  try {
    const answer = await api("batches", {
      method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
    });
    alertStatus(`Batch ${answer.batch_id} is running.`, false);
    showLive(answer.batch_id);
    await refreshBatches();
    selectBatch(answer.batch_id);
  } catch (error) {
    if (!(error instanceof Unauthorized)) alertStatus(error.message, true);
  }
}

// -- start ------------------------------------------------------------------------------------

async function start() {
  let info;
  try {
    info = await api("tasks");
  } catch (error) {
    if (!(error instanceof Unauthorized)) alertStatus(error.message, true);
    return;
  }
  $("#token-form").hidden = true;
  const select = $("#task-select");
  select.replaceChildren(...info.tasks.map((name) => new Option(name, name)));
  $("#submit-form").hidden = info.read_only || info.tasks.length === 0;
  if (!state.following) {
    state.following = true;
    follow();
  }
  await refreshBatches();
  if (state.started) return;
  state.started = true;
  setInterval(() => {
    if ([...state.batches.values()].some((batch) => batch.state === "running")) refreshBatches();
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value);
    $("#token-input").value = "";
    start();
  });
  $("#submit-form").addEventListener("submit", submitBatch);
  $("#results-status").addEventListener("change", () => {
    state.offset = 0;
    loadResults();
  });
  $("#results-prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - RESULTS_PAGE);
    loadResults();
  });
  $("#results-next").addEventListener("click", () => {
    state.offset += state.shown;
    loadResults();
  });
  $("#batches-newer").addEventListener("click", () => {
    state.batchOffset = Math.max(0, state.batchOffset - BATCHES_PAGE);
    refreshBatches();
  });
  $("#batches-older").addEventListener("click", () => {
    state.batchOffset += BATCHES_PAGE;
    refreshBatches();
  });
  start();
});
