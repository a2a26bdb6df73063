// SVG building blocks shared by the views: elements, text measurement, hover text, the
// coloured token strip, the colour legend, and export as SVG, PNG or JSON.
//
// Every style is an attribute on the element, so that the exported SVG (and the PNG drawn
// from it) looks exactly like the page.

import { colour, fmt, ink, pct } from "./colours.js";

const NS = "http://www.w3.org/2000/svg";
export const FONT = "13px 'DejaVu Sans Mono', ui-monospace, monospace";
const FONT_FAMILY = "'DejaVu Sans Mono', ui-monospace, monospace";

/** An SVG element with attributes and children (strings become text nodes). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const child of children) {
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

/** A text element in the figures' font. */
export function text(x, y, content, attrs = {}) {
  return el("text", { x, y, "font-family": FONT_FAMILY, "font-size": 13, fill: "#1f2328", ...attrs },
    content);
}

let canvas = null;
/** Width in pixels of `content` in the figures' font (`size` px). */
export function measure(content, size = 13) {
  canvas = canvas || document.createElement("canvas");
  const ctx = canvas.getContext("2d");
  ctx.font = FONT.replace("13px", `${size}px`);
  return ctx.measureText(content).width;
}

/** A new figure: an <svg> with a white background, sized later by `fit`. */
export function figure() {
  const svg = el("svg", { xmlns: NS, class: "figure", "font-family": FONT_FAMILY });
  svg.append(el("rect", { class: "background", x: 0, y: 0, width: "100%", height: "100%",
    fill: "#ffffff" }));
  return svg;
}

/** Size `svg` to its content (call once it is in the document). */
export function fit(svg, pad = 10) {
  const box = svg.getBBox();
  const width = Math.ceil(box.x + box.width + pad);
  const height = Math.ceil(box.y + box.height + pad);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
}

/** Show `lines` in the page's tooltip while the pointer is on `node`; also a <title>. */
export function hover(node, lines) {
  const content = lines.join("\n");
  node.append(el("title", {}, content));
  const tip = document.getElementById("tooltip");
  node.addEventListener("mouseenter", () => {
    tip.textContent = content;
    tip.hidden = false;
  });
  node.addEventListener("mousemove", (event) => {
    tip.style.left = `${event.clientX + 14}px`;
    tip.style.top = `${event.clientY + 14}px`;
  });
  node.addEventListener("mouseleave", () => {
    tip.hidden = true;
  });
}

/** How a token is shown: whitespace made visible, never empty. */
export function shown(token) {
  const visible = token.replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  return visible || "\u2205";
}

const BYTE = /<0x([0-9A-Fa-f]{2})>/g;

/** The bytes a token text stands for: its text in UTF-8, `<0xE4>` pieces as their byte. */
function bytesOf(token) {
  const out = [];
  let last = 0;
  for (const match of token.matchAll(BYTE)) {
    out.push(...new TextEncoder().encode(token.slice(last, match.index)));
    out.push(parseInt(match[1], 16));
    last = match.index + match[0].length;
  }
  out.push(...new TextEncoder().encode(token.slice(last)));
  return Uint8Array.from(out);
}

/**
 * The tokens as display pieces: a token shown as bytes (`<0xE4><0xBD>`, part of a UTF-8
 * character) is joined with the tokens after it until the bytes make whole characters;
 * every other token is a piece of its own. Each piece: `{first, last, text}`.
 */
export function pieces(tokens) {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const out = [];
  for (let i = 0; i < tokens.length; i++) {
    if (!tokens[i].match(BYTE)) {
      out.push({ first: i, last: i, text: tokens[i] });
      continue;
    }
    let j = i;
    let bytes = bytesOf(tokens[i]);
    let text = null;
    for (;;) {
      try {
        text = decoder.decode(bytes);
        break;
      } catch {
        if (j + 1 >= tokens.length || !tokens[j + 1].match(BYTE)) break;
        j += 1;
        bytes = Uint8Array.from([...bytes, ...bytesOf(tokens[j])]);
      }
    }
    out.push({ first: i, last: j, text: text ?? tokens.slice(i, j + 1).join("") });
    i = j;
  }
  return out;
}

/**
 * Tokens coloured by their scores, wrapped at `width`; returns the height used. Tokens
 * that are parts of one character (byte pieces) show as one cell with their summed score.
 *
 * options: `limit` (the scale's limit), `shares` (signed shares to show on hover),
 * `label(i)` (hover title of token i), `marked` (an index to outline), `dimFrom` (tokens
 * from this index on are drawn faint: they cannot contribute), `onClick(i)`.
 */
export function tokenStrip(parent, x0, y0, width, tokens, scores, options) {
  const height = 24;
  const gap = 4;
  let x = x0;
  let y = y0;
  const sum = (values, p) => values.slice(p.first, p.last + 1).reduce((s, v) => s + v, 0);
  for (const piece of pieces(tokens)) {
    const i = piece.first;
    const label = shown(piece.text);
    const w = Math.ceil(measure(label)) + 10;
    if (x > x0 && x + w > x0 + width) {
      x = x0;
      y += height + gap;
    }
    const score = sum(scores, piece);
    const faint = options.dimFrom !== undefined && i >= options.dimFrom;
    const marked = options.marked !== undefined && piece.first <= options.marked &&
      options.marked <= piece.last;
    const group = el("g", { class: "token", "data-index": i, "data-last": piece.last,
      "data-score": score, "data-token": piece.text, opacity: faint ? 0.45 : 1 });
    group.append(el("rect", { x, y, width: w, height, rx: 3, fill: colour(score, options.limit),
      stroke: marked ? "#1f2328" : "#d0d7de", "stroke-width": marked ? 2 : 1 }));
    group.append(text(x + 5, y + 16, label, { fill: ink(score, options.limit) }));
    const lines = [];
    for (let k = piece.first; k <= piece.last; k++) lines.push(options.label(k));
    lines.push(`score ${fmt(score, 6)}`);
    if (piece.last > piece.first) lines.push(`(${piece.last - piece.first + 1} tokens summed)`);
    if (options.shares) lines.push(`share ${pct(sum(options.shares, piece))}`);
    hover(group, lines);
    if (options.onClick) group.addEventListener("click", () => options.onClick(piece.last));
    parent.append(group);
    x += w + gap;
  }
  return y + height - y0;
}

/** A colour bar from -limit to +limit with its end values; returns the height used. */
export function legend(parent, x, y, limit, caption) {
  const id = `scale-${Math.random().toString(36).slice(2)}`;
  const gradient = el("linearGradient", { id, x1: 0, x2: 1, y1: 0, y2: 0 });
  for (let k = 0; k <= 10; k++) {
    const value = -limit + (2 * limit * k) / 10;
    gradient.append(el("stop", { offset: `${k * 10}%`, "stop-color": colour(value, limit) }));
  }
  parent.append(el("defs", {}, gradient));
  const width = 220;
  parent.append(text(x, y + 12, caption, { "font-size": 12, fill: "#59636e" }));
  parent.append(el("rect", { x, y: y + 18, width, height: 12, fill: `url(#${id})`,
    stroke: "#d0d7de" }));
  parent.append(text(x, y + 44, fmt(-limit, 3), { "font-size": 11 }));
  parent.append(text(x + width / 2, y + 44, "0", { "font-size": 11, "text-anchor": "middle" }));
  parent.append(text(x + width, y + 44, `+${fmt(limit, 3)}`,
    { "font-size": 11, "text-anchor": "end" }));
  return 48;
}

/** Lines of text, one under the other; returns the height used. */
export function lines(parent, x, y, rows, attrs = {}) {
  rows.forEach((row, k) => parent.append(text(x, y + 16 + 18 * k, row, attrs)));
  return 18 * rows.length + 4;
}

// ---------------------------------------------------------------------------- export

function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function svgText(svg) {
  return new XMLSerializer().serializeToString(svg);
}

export function saveSvg(svg, name) {
  save(new Blob([svgText(svg)], { type: "image/svg+xml" }), name);
}

/** The figure as a PNG, drawn at twice its size. */
export async function savePng(svg, name) {
  const width = Number(svg.getAttribute("width"));
  const height = Number(svg.getAttribute("height"));
  const image = new Image();
  const url = URL.createObjectURL(new Blob([svgText(svg)], { type: "image/svg+xml" }));
  await new Promise((resolve, reject) => {
    image.onload = resolve;
    image.onerror = () => reject(new Error("the figure could not be drawn as PNG"));
    image.src = url;
  });
  const scale = 2;
  const canvasEl = document.createElement("canvas");
  canvasEl.width = width * scale;
  canvasEl.height = height * scale;
  const ctx = canvasEl.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvasEl.width, canvasEl.height);
  ctx.scale(scale, scale);
  ctx.drawImage(image, 0, 0, width, height);
  URL.revokeObjectURL(url);
  const blob = await new Promise((resolve) => canvasEl.toBlob(resolve, "image/png"));
  save(blob, name);
}

export function saveJson(value, name) {
  save(new Blob([JSON.stringify(value, null, 2)], { type: "application/json" }), name);
}
