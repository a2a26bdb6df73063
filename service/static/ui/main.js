// The page: the API key, the model card, the prompt and its limits, the position and the
// target, the tabs, and the states of a run (loading, error, done); the views draw.

import { ServiceError, call, storeKey, storedKey } from "./api.js";
import { fit, saveJson, savePng, saveSvg, shown } from "./svg.js";
import { VIEWS } from "./views.js";

/** The service refuses prompts longer than max_input_tokens times this many characters. */
const MAX_CHARS_PER_TOKEN = 256;
const FREE = "free";

const $ = (id) => document.getElementById(id);
const state = {
  card: null,
  view: "tokens",
  prompt: "",
  tokens: [], // the prompt's tokens (from /v1/tokenize)
  position: null, // the position whose next token is attributed
  candidates: [], // the model's top-5 next tokens at that position
  overLimit: "", // why the prompt cannot be sent, if it cannot
  candidatesFor: "", // the prompt and position the candidates are for
  results: {}, // view -> { svg, exchanges, inputs }: the latest figure and what it is of
};

// ---------------------------------------------------------------------------- key, card

async function start() {
  let card;
  try {
    card = await call("model");
  } catch (err) {
    if (err instanceof ServiceError && err.status === 401) return askKey(err);
    $("model-card").textContent = `The service did not answer: ${err.message}`;
    return undefined;
  }
  state.card = card;
  $("key-form").hidden = true;
  $("main").hidden = false;
  showCard(card);
  await prepare();
  return run();
}

/** Ask for the key; `err` is the service's 401 (its message shown once a key was tried). */
function askKey(err) {
  $("main").hidden = true;
  $("key-form").hidden = false;
  $("model-card").textContent = "The model card shows once the service has the key.";
  $("key-error").textContent = storedKey() ? err.message : "";
  storeKey(null);
  $("api-key").focus();
}

function showCard(card) {
  const limits = card.limits;
  const facts = [
    ["model", card.id],
    ["family", card.family],
    ["layers", card.num_layers],
    ["heads", `${card.num_heads} (kv ${card.num_kv_heads})`],
    ["hidden", card.hidden_size],
    ["MLP", card.intermediate_size],
    ["vocab", card.vocab_size],
    ["device", `${card.device}, ${card.dtype}`],
    ["max input", `${limits.max_input_tokens} tokens`],
    ["max new", `${limits.max_new_tokens} tokens`],
    ["timeout", `${limits.request_timeout_s} s`],
  ];
  const box = $("model-card");
  box.textContent = "";
  box.className = "card model";
  for (const [name, value] of facts) {
    const item = document.createElement("span");
    const b = document.createElement("b");
    b.textContent = `${name} `;
    item.append(b, String(value));
    item.dataset.fact = name;
    box.append(item);
  }
  const layer = $("neuron-layer");
  layer.textContent = "";
  for (let l = 0; l < card.num_layers; l++) layer.append(new Option(`${l}`, `${l}`));
  // every neuron of every layer: one reverse-mode request (taylor split), top-k kept
  layer.append(new Option("all (taylor)", "all"));
  $("max-new").max = String(limits.max_new_tokens);
}

// ---------------------------------------------------------------------------- prompt

/** Why `prompt` of `count` tokens cannot be sent ("" when it can). */
function limitMessage(prompt, count) {
  const limit = state.card.limits.max_input_tokens;
  if (prompt.trim() === "") return "Type a prompt.";
  if (prompt.length > limit * MAX_CHARS_PER_TOKEN) {
    return `The prompt is ${prompt.length} characters: it cannot fit this service's limit ` +
      `of ${limit} tokens. Shorten it.`;
  }
  if (count > limit) {
    return `The prompt is ${count} tokens, over this service's limit of ${limit} tokens. ` +
      "Shorten it.";
  }
  return "";
}

/** Tokenize the prompt (unless it is over the limit), show its count and positions, and
 * fetch the top-5 next tokens at the chosen position; resolves to true. */
async function prepare() {
  const prompt = $("prompt").value;
  const changed = prompt !== state.prompt;
  state.prompt = prompt;
  if (changed) {
    state.tokens = [];
    state.position = null;
    clearFigures();
  }
  state.overLimit = limitMessage(prompt, 0);
  if (!state.overLimit && changed) {
    const answer = await call("tokenize", { prompt });
    if ($("prompt").value !== prompt) return prepare();
    state.tokens = answer.tokens;
    state.overLimit = limitMessage(prompt, answer.num_tokens);
  } else if (!state.overLimit) {
    state.overLimit = limitMessage(prompt, state.tokens.length);
  }
  const limit = state.card.limits.max_input_tokens;
  $("token-count").textContent = state.tokens.length
    ? `${state.tokens.length} tokens (this service's limit: ${limit})` : "";
  $("limit").textContent = state.overLimit;
  $("run").disabled = Boolean(state.overLimit);
  if (state.overLimit) {
    showPositions([]);
    return true;
  }
  if (state.position === null) state.position = state.tokens.length - 1;
  showPositions(state.tokens);
  if (state.candidatesFor !== `${prompt}|${state.position}`) await loadCandidates();
  return true;
}

/** Take down what belonged to the previous prompt: its error and its figures. */
function clearFigures() {
  $("error").hidden = true;
  $("tooltip").hidden = true;
  for (const section of document.querySelectorAll("section.view")) {
    section.textContent = "";
    delete section.dataset.ready;
  }
}

function showPositions(tokens) {
  const box = $("positions");
  box.textContent = "";
  tokens.forEach((token, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = shown(token);
    button.title = `position ${i}`;
    button.dataset.position = String(i);
    button.setAttribute("aria-pressed", String(i === state.position));
    button.addEventListener("click", async () => {
      state.position = i;
      showPositions(state.tokens);
      await guarded(loadCandidates);
      run();
    });
    box.append(button);
  });
}

/** The target picker: the model's top-5 next tokens at the position, and a free token. */
async function loadCandidates() {
  const answer = await call("next_tokens", {
    prompt: state.prompt, positions: [state.position], top_k: 5,
  });
  state.candidates = answer.predictions[0];
  state.candidatesFor = `${state.prompt}|${state.position}`;
  const select = $("target");
  select.textContent = "";
  for (const c of state.candidates) {
    const label = `${JSON.stringify(c.token)}  p=${c.probability.toFixed(3)}  logit ${c.logit.toFixed(2)}`;
    select.append(new Option(label, String(c.id)));
  }
  select.append(new Option("another token…", FREE));
  $("free-target").hidden = true;
}

/** The target to send: a token id, or the free token's text. */
function target() {
  const value = $("target").value;
  if (value === FREE) return $("free-target").value;
  return Number(value);
}

// ---------------------------------------------------------------------------- running

function showError(err) {
  const box = $("error");
  if (err instanceof ServiceError && err.status === 401) {
    askKey(err);
    return;
  }
  const where = err.param ? ` (field: ${err.param})` : "";
  box.textContent = `${err.message}${where}`;
  box.dataset.status = err.status ?? "";
  box.hidden = false;
  $("status").textContent = "";
}

/** Run `job`, showing its failure (the service's message) instead of throwing. */
async function guarded(job) {
  try {
    return await job();
  } catch (err) {
    showError(err);
    return undefined;
  }
}

async function run() {
  $("error").hidden = true;
  const view = state.view;
  const section = $(`view-${view}`);
  if ((await guarded(prepare)) === undefined) return;
  if (state.overLimit) {
    $("status").textContent = "";
    return;
  }
  const spec = VIEWS[view];
  const params = viewParams();
  if (view === "generation") {
    const limits = state.card.limits;
    let message = "";
    if (params.maxNewTokens > limits.max_new_tokens) {
      message = `At most ${limits.max_new_tokens} new tokens on this service.`;
    } else if (state.tokens.length + params.maxNewTokens - 1 > limits.max_input_tokens) {
      message = `The prompt and ${params.maxNewTokens} new tokens would pass this ` +
        `service's limit of ${limits.max_input_tokens} tokens.`;
    }
    if (message) {
      $("limit").textContent = message;
      return;
    }
  }
  if (spec.usesTarget && $("target").value === FREE && !$("free-target").value) {
    $("status").textContent = "Type the target token, then press Enter.";
    return;
  }
  const exchanges = [];
  const ctx = {
    prompt: state.prompt,
    tokens: state.tokens,
    position: state.position,
    target: target(),
    card: state.card,
    params,
    async post(path, body) {
      const response = await call(path, body);
      exchanges.push({ endpoint: `POST /v1/${path}`, request: body, response });
      return response;
    },
    redraw: (again, selected) => guarded(async () => draw(section, view,
      await spec.run(again, selected), exchanges)),
  };
  $("status").textContent = `Running the ${view} view…`;
  section.setAttribute("aria-busy", "true");
  $("run").disabled = true;
  const clock = performance.now();
  try {
    const svg = await spec.run(ctx);
    draw(section, view, svg, exchanges);
    $("status").textContent = `${view}: done in ${((performance.now() - clock) / 1000).toFixed(2)} s`;
  } catch (err) {
    showError(err);
  } finally {
    section.removeAttribute("aria-busy");
    $("run").disabled = Boolean(state.overLimit);
  }
}

function draw(section, view, svg, exchanges) {
  $("tooltip").hidden = true;
  section.textContent = "";
  section.append(svg);
  fit(svg);
  state.results[view] = { svg, exchanges, inputs: inputsOf(view) };
  section.dataset.ready = "true";
}

function viewParams() {
  return {
    neuronLayer: $("neuron-layer").value === "all" ? "all" : Number($("neuron-layer").value || 0),
    neuronK: Math.max(1, Number($("neuron-k").value) || 10),
    maxNewTokens: Math.max(1, Number($("max-new").value) || 1),
  };
}

/** What a view's figure depends on: a figure of other inputs is drawn again. */
function inputsOf(view) {
  const params = viewParams();
  const inputs = { prompt: $("prompt").value };
  if (VIEWS[view].usesTarget) {
    Object.assign(inputs, { position: state.position, target: $("target").value,
      free: $("free-target").value });
  }
  if (view === "neurons") Object.assign(inputs, { layer: params.neuronLayer, k: params.neuronK });
  if (view === "generation") inputs.maxNewTokens = params.maxNewTokens;
  return JSON.stringify(inputs);
}

function selectView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === view));
  }
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.dataset.view !== view;
  }
  for (const control of document.querySelectorAll("#controls [data-for]")) {
    control.hidden = control.dataset.for !== view;
  }
  $("target-row").hidden = !VIEWS[view].usesTarget;
  const result = state.results[view];
  if (state.card && (!result || result.inputs !== inputsOf(view))) run();
}

function exportView(kind) {
  const result = state.results[state.view];
  if (!result) {
    $("status").textContent = "Run the view first.";
    return;
  }
  const name = `depass-${state.view}`;
  if (kind === "svg") saveSvg(result.svg, `${name}.svg`);
  if (kind === "png") guarded(() => savePng(result.svg, `${name}.png`));
  if (kind === "json") saveJson({ model: state.card.id, exchanges: result.exchanges }, `${name}.json`);
}

// ---------------------------------------------------------------------------- wiring

function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey($("api-key").value.trim());
    $("api-key").value = "";
    start();
  });
  let timer = null;
  $("prompt").addEventListener("input", () => {
    clearTimeout(timer);
    state.results = {};
    timer = setTimeout(() => guarded(prepare), 300);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) run();
  });
  $("run").addEventListener("click", () => {
    state.results = {};
    run();
  });
  $("target").addEventListener("change", () => {
    const free = $("target").value === FREE;
    $("free-target").hidden = !free;
    if (free) $("free-target").focus();
    else run();
  });
  $("free-target").addEventListener("keydown", (event) => {
    if (event.key === "Enter") run();
  });
  for (const id of ["neuron-layer", "neuron-k", "max-new"]) {
    $(id).addEventListener("change", () => run());
  }
  for (const tab of document.querySelectorAll(".tabs button")) {
    tab.addEventListener("click", () => selectView(tab.dataset.view));
  }
  $("export-png").addEventListener("click", () => exportView("png"));
  $("export-svg").addEventListener("click", () => exportView("svg"));
  $("export-json").addEventListener("click", () => exportView("json"));
  selectView("tokens");
}

wire();
start();
