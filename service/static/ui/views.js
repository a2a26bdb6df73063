// The four views. Each takes the page's context and resolves to the figure (an <svg>) and
// the exchanges it made ({request, response} pairs, for the JSON export):
//
//   ctx = { prompt, tokens, position, target, targetText, card, params, post(path, body) }
//
// `target` is a token id or a free token string; `post` records each exchange.

import { arrayOf } from "./api.js";
import { colour, fmt, limitOf, pct, shares } from "./colours.js";
import { el, figure, hover, legend, lines, shown, text, tokenStrip } from "./svg.js";

const WIDTH = 900;

function quoted(token) {
  return JSON.stringify(token);
}

/** Tokens view: each input token's score for the target at the chosen position. */
async function tokensView(ctx) {
  const request = {
    prompt: ctx.prompt,
    granularity: "token",
    positions: [ctx.position],
    targets: [ctx.target],
    outputs: ["scores"],
    array_encoding: "list",
  };
  const answer = await ctx.post("attributions", request);
  const scores = arrayOf(answer.scores)[0].map((row) => row[0]); // (M,)
  const remainder = arrayOf(answer.remainder_scores)[0][0];
  const logit = arrayOf(answer.logits)[0][0];
  const limit = limitOf(scores);
  const withRemainder = shares([...scores, remainder]);
  const share = withRemainder.slice(0, -1);
  const position = answer.positions[0];
  const svg = figure();
  let y = 8;
  y += lines(svg, 10, y, [
    `target ${quoted(answer.target_tokens[0])} (id ${answer.targets[0]}) after position ` +
      `${position} ${quoted(answer.tokens[position])}`,
  ], { "font-weight": 700 });
  y += tokenStrip(svg, 10, y + 4, WIDTH, answer.tokens, scores, {
    limit,
    shares: share,
    label: (i) => answer.components[i],
    marked: position,
    dimFrom: position + 1,
  }) + 14;
  const sum = scores.reduce((s, v) => s + v, 0);
  const numbers = el("g", { class: "numbers" });
  lines(numbers, 10, y, [
    `logit ${fmt(logit)} = components ${fmt(sum)} + remainder ${fmt(remainder)}`,
    `remainder (biases) ${fmt(remainder, 6)}, share ${pct(withRemainder.at(-1))}`,
    `conservation error ${answer.conservation_error.toExponential(2)} ` +
      `(relative ${answer.relative_conservation_error.toExponential(2)})`,
  ]);
  svg.append(numbers);
  legend(svg, 560, y, limit, "score (red raises the logit, blue lowers it)");
  return svg;
}

/** Heads view: every head of every layer, from one head request over all layers. */
async function headsView(ctx, selected = null) {
  const layers = ctx.card.num_layers;
  const heads = ctx.card.num_heads;
  const request = {
    prompt: ctx.prompt,
    granularity: "head",
    start_layer: Array.from({ length: layers }, (_, l) => l),
    targets: [ctx.target],
    outputs: ["scores"],
    array_encoding: "list",
  };
  const answer = ctx.cached || (await ctx.post("attributions", request));
  const scores = arrayOf(answer.scores); // (L, N, H + 1, 1): component 0 is "rest"
  if (scores.length !== layers || scores[0][0].length !== heads + 1) {
    throw new Error(`unexpected head scores: ${scores.length} layers x ` +
      `${scores[0][0].length} components for ${layers} layers x ${heads} heads`);
  }
  const position = ctx.position;
  const at = (l, h, q = position) => scores[l][q][h + 1][0];
  const grid = [];
  for (let l = 0; l < layers; l++) for (let h = 0; h < heads; h++) grid.push(at(l, h));
  const limit = limitOf(grid);
  const share = shares(grid);
  const svg = figure();
  let y = 8;
  y += lines(svg, 10, y, [
    `heads: contribution to ${quoted(answer.target_tokens[0])} (id ${answer.targets[0]}) ` +
      `at position ${position} ${quoted(answer.tokens[position])}`,
  ], { "font-weight": 700 });
  const cellW = Math.max(28, Math.min(56, Math.floor(700 / heads)));
  const cellH = 22;
  const x0 = 52;
  const top = y + 22;
  for (let h = 0; h < heads; h++) {
    svg.append(text(x0 + h * cellW + cellW / 2, top - 6, `H${h}`,
      { "font-size": 11, "text-anchor": "middle" }));
  }
  const cells = el("g", { class: "grid" });
  for (let l = 0; l < layers; l++) {
    const yl = top + l * cellH;
    cells.append(text(x0 - 8, yl + 15, `L${l}`, { "font-size": 11, "text-anchor": "end" }));
    for (let h = 0; h < heads; h++) {
      const score = at(l, h);
      const cell = el("rect", { class: "cell", x: x0 + h * cellW, y: yl, width: cellW - 1,
        height: cellH - 1, fill: colour(score, limit), "data-layer": l, "data-head": h,
        "data-score": score,
        stroke: selected && selected[0] === l && selected[1] === h ? "#1f2328" : "none",
        "stroke-width": 2 });
      hover(cell, [`L${l}.H${h}`, `score ${fmt(score, 6)}`, `share ${pct(share[l * heads + h])}`]);
      cell.addEventListener("click", () => ctx.redraw({ ...ctx, cached: answer }, [l, h]));
      cells.append(cell);
    }
  }
  svg.append(cells);
  y = top + layers * cellH + 10;
  legend(svg, x0, y, limit, "score of each head (click a cell for its token scores)");
  y += 56;
  svg.append(text(10, y + 12, `conservation error ${answer.conservation_error.toExponential(2)}`,
    { "font-size": 12, fill: "#59636e" }));
  y += 26;
  if (selected) {
    const [l, h] = selected;
    const row = answer.tokens.map((_, q) => at(l, h, q));
    const detail = el("g", { class: "head-detail", "data-layer": l, "data-head": h });
    y += lines(detail, 10, y, [
      `L${l}.H${h}: its contribution to ${quoted(answer.target_tokens[0])} read at each position`,
    ], { "font-weight": 700 });
    tokenStrip(detail, 10, y + 4, WIDTH, answer.tokens, row, {
      limit: limitOf(row),
      shares: shares(row),
      label: (q) => `L${l}.H${h} at position ${q}`,
      marked: position,
    });
    svg.append(detail);
  }
  return svg;
}

/** The neuron scores of the chosen position and target, with the request's own `fields`. */
function askNeurons(ctx, fields) {
  return ctx.post("attributions", {
    prompt: ctx.prompt,
    granularity: "neuron",
    positions: [ctx.position],
    targets: [ctx.target],
    outputs: ["scores"],
    array_encoding: "list",
    ...fields,
  });
}

/** Every neuron of every layer, ranked by |score|: one reverse-mode request (taylor split)
 * that keeps each layer's top k; the layers' picks are ranked together. */
async function allNeurons(ctx, k) {
  const layers = [...Array(ctx.card.num_layers).keys()];
  const answer = await askNeurons(ctx, { start_layer: layers, mlp_split: "taylor", top_k: k });
  const perLayer = arrayOf(answer.scores); // (layers, 1, kept, 1)
  const neurons = [];
  perLayer.forEach((rows, l) => rows[0].forEach((row, i) => {
    const label = answer.layer_components[l][i];
    if (label !== "rest") neurons.push({ label, score: row[0] });
  }));
  const width = ctx.card.intermediate_size * layers.length;
  return { answer, neurons, title: `all ${layers.length} layers (taylor, ${answer.strategy})`,
    total: width, rest: null, remainder: arrayOf(answer.remainder_scores).at(-1)[0][0] };
}

/** Neurons view: the top-k neurons of one layer's MLP, or of every layer, by |score|. */
async function neuronsView(ctx) {
  const layer = ctx.params.neuronLayer;
  const k = ctx.params.neuronK;
  let found;
  if (layer === "all") {
    found = await allNeurons(ctx, k);
  } else {
    const answer = await askNeurons(ctx, { start_layer: layer });
    const scores = arrayOf(answer.scores)[0].map((row) => row[0]); // (1 + I,): 0 is "rest"
    found = { answer, title: `layer ${layer}`, rest: scores[0],
      remainder: arrayOf(answer.remainder_scores)[0][0],
      neurons: scores.slice(1).map((score, i) => ({ label: answer.components[i + 1], score })) };
    found.total = found.neurons.length;
  }
  const { answer, neurons, remainder } = found;
  neurons.sort((a, b) => Math.abs(b.score) - Math.abs(a.score));
  const top = neurons.slice(0, k);
  const limit = limitOf(top.map((n) => n.score));
  const logit = arrayOf(answer.logits).flat(Infinity).at(-1);
  const svg = figure();
  let y = 8;
  y += lines(svg, 10, y, [
    `${found.title}: top ${top.length} of ${found.total} neurons for ` +
      `${quoted(answer.target_tokens[0])} at position ${answer.positions[0]}`,
  ], { "font-weight": 700 });
  const x0 = 120;
  const half = 300;
  const mid = x0 + half;
  const bars = el("g", { class: "bars" });
  top.forEach((n, r) => {
    const yr = y + 6 + r * 22;
    const w = limit > 0 ? (half * Math.abs(n.score)) / limit : 0;
    const bar = el("rect", { class: "bar", x: n.score >= 0 ? mid : mid - w, y: yr, width: w,
      height: 18, fill: colour(n.score, limit), stroke: "#59636e", "stroke-width": 0.5,
      "data-label": n.label, "data-score": n.score });
    hover(bar, [n.label, `score ${fmt(n.score, 6)}`, `of the logit ${pct(n.score / logit)}`]);
    bars.append(text(x0 - 8, yr + 14, n.label, { "text-anchor": "end", "font-size": 12 }));
    bars.append(bar);
    bars.append(text(mid + half + 10, yr + 14, fmt(n.score), { "font-size": 12 }));
  });
  bars.append(el("line", { x1: mid, x2: mid, y1: y, y2: y + 10 + top.length * 22,
    stroke: "#1f2328" }));
  svg.append(bars);
  y += 16 + top.length * 22;
  const rest = found.rest === null ? "" :
    `rest (attention and the other neurons) ${fmt(found.rest)}, `;
  lines(svg, 10, y, [
    `${rest}remainder ${fmt(remainder)}, logit ${fmt(logit)}`,
    `conservation error ${answer.conservation_error.toExponential(2)}`,
  ], { "font-size": 12, fill: "#59636e" });
  return svg;
}

/** Generation view: each generated token against the tokens before it. */
async function generationView(ctx) {
  const request = {
    prompt: ctx.prompt,
    max_new_tokens: ctx.params.maxNewTokens,
    array_encoding: "list",
  };
  const answer = await ctx.post("generate", request);
  const scores = arrayOf(answer.scores); // (G, M)
  const sources = [...answer.prompt_tokens, ...answer.generated_tokens.slice(0, -1)];
  const n = answer.prompt_tokens.length;
  const svg = figure();
  let y = 8;
  y += lines(svg, 10, y, [`generated ${quoted(answer.text)} (${answer.finish_reason}); ` +
    "each row: where that token came from (scale per row)"], { "font-weight": 700 });
  const cellW = 26;
  const cellH = 22;
  const x0 = 110;
  const top = y + 70;
  sources.forEach((token, j) => {
    const x = x0 + j * cellW + cellW / 2;
    svg.append(text(x, top - 6, shown(token), { "font-size": 11,
      transform: `rotate(-50 ${x} ${top - 6})`, fill: j >= n ? "#0b57d0" : "#1f2328" }));
  });
  const rows = el("g", { class: "matrix" });
  answer.generated_tokens.forEach((token, i) => {
    const yr = top + i * cellH;
    const row = scores[i].slice(0, n + i);
    const limit = limitOf(row);
    const share = shares(row, arrayOf(answer.remainder_scores)[i]);
    const group = el("g", { class: "generated", "data-index": i, "data-token": token });
    group.append(text(x0 - 8, yr + 15, shown(token), { "text-anchor": "end", fill: "#0b57d0" }));
    row.forEach((score, j) => {
      const cell = el("rect", { class: "cell", x: x0 + j * cellW, y: yr, width: cellW - 1,
        height: cellH - 1, fill: colour(score, limit), "data-score": score });
      hover(cell, [`${quoted(token)} from ${answer.components[j]}`, `score ${fmt(score, 6)}`,
        `share ${pct(share[j])}`]);
      group.append(cell);
    });
    rows.append(group);
  });
  svg.append(rows);
  y = top + answer.generated_tokens.length * cellH + 16;
  lines(svg, 10, y, [`conservation error ${answer.conservation_error.toExponential(2)}; ` +
    "red: raised the generated token's logit, blue: lowered it"],
  { "font-size": 12, fill: "#59636e" });
  return svg;
}

export const VIEWS = {
  tokens: { run: tokensView, usesTarget: true },
  heads: { run: headsView, usesTarget: true },
  neurons: { run: neuronsView, usesTarget: true },
  generation: { run: generationView, usesTarget: false },
};
