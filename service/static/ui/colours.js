// The diverging colour scale and the share of a score: one definition for every view.
//
// Colours follow ColorBrewer's RdBu (as matplotlib's "RdBu_r" in the SDK's plots): red
// raises the target's logit, blue lowers it, white is zero; the scale is symmetric, from
// -max|score| to +max|score| of the figure, so zero always sits in the middle.

const POSITIVE = ["#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"];
const NEGATIVE = ["#f7f7f7", "#d1e5f0", "#92c5de", "#4393c3", "#2166ac", "#053061"];

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

/** The colour of `score` on a scale from -limit to +limit (an "rgb(r, g, b)" string). */
export function colour(score, limit) {
  const stops = score < 0 ? NEGATIVE : POSITIVE;
  const t = limit > 0 ? Math.min(1, Math.abs(score) / limit) : 0;
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const a = hexToRgb(stops[i]);
  const b = hexToRgb(stops[i + 1]);
  const f = x - i;
  const rgb = a.map((v, k) => Math.round(v + (b[k] - v) * f));
  return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
}

/** Text that stays readable on `colour(score, limit)`. */
export function ink(score, limit) {
  return limit > 0 && Math.abs(score) / limit > 0.6 ? "#ffffff" : "#1f2328";
}

/** The largest |value| (the scale's limit); 0 for no values. */
export function limitOf(values) {
  return values.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
}

/** Each score's signed share of the total absolute credit (`extra`: the remainder). */
export function shares(scores, extra = 0) {
  const total = scores.reduce((s, v) => s + Math.abs(v), Math.abs(extra));
  return scores.map((v) => (total > 0 ? v / total : 0));
}

export function fmt(value, digits = 4) {
  return Number(value).toFixed(digits);
}

export function pct(value) {
  return `${(100 * value).toFixed(1)} %`;
}
