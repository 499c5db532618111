// Markdown for model answers, rendered into DOM nodes without ever parsing HTML.
//
// Model output is untrusted text. Every piece of it ends up in a Text node
// (append(string) / textContent), never in innerHTML, so `<script>` or
// `<img onerror=…>` in an answer is shown as the characters it is. Links keep
// http(s) URLs only. The subset is what chat answers use: paragraphs and line
// breaks, fenced code blocks, code spans, bold, italic, bulleted and numbered
// lists, links. Anything else stays plain text.

const FENCE = /^\s*(```|~~~)/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;

// Inline spans, earliest match first; on a tie the earlier entry wins (code before
// links before bold before italic), so `**x**` is bold, not two italics.
// Underscores only emphasise whole words, so snake_case and __names stay text.
const INLINE = [
  ["code", /`([^`\n]+)`/],
  ["link", /\[([^\]\n]+)\]\(([^()\s]+)\)/],
  ["strong", /\*\*(?=\S)([^*]*?\S)\*\*|(?<![\p{L}\p{N}_])__(?=\S)([^_]*?\S)__(?![\p{L}\p{N}_])/u],
  ["em", /\*(?=\S)([^*]*?\S)\*|(?<![\p{L}\p{N}_])_(?=\S)([^_]*?\S)_(?![\p{L}\p{N}_])/u],
];

/** Replace the children of `target` with `source` rendered as Markdown. */
export function renderMarkdown(source, target) {
  target.replaceChildren(...blocks(source.replace(/\r\n?/g, "\n").split("\n")));
}

function blocks(lines) {
  const out = [];
  let i = 0;
  const startsBlock = (line) => FENCE.test(line) || BULLET.test(line) || NUMBERED.test(line);
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length && !lines[i].trim().startsWith(fence[1]); i += 1) {
        body.push(lines[i]);
      }
      i += 1; // the closing fence; one still being streamed runs to the end
      const code = element("code");
      code.textContent = body.join("\n");
      const pre = element("pre");
      pre.append(code);
      out.push(pre);
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const pattern = BULLET.test(line) ? BULLET : NUMBERED;
      const list = element(pattern === BULLET ? "ul" : "ol");
      if (pattern === NUMBERED) list.start = Number(NUMBERED.exec(line)[1]);
      for (; i < lines.length && pattern.test(lines[i]); i += 1) {
        const match = pattern.exec(lines[i]);
        const item = element("li");
        inline(match[match.length - 1], item);
        list.append(item);
      }
      out.push(list);
    } else if (!line.trim()) {
      i += 1;
    } else {
      const paragraph = element("p");
      for (let first = true; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) {
        if (!first) paragraph.append(element("br"));
        inline(lines[i].trim(), paragraph);
        first = false;
      }
      out.push(paragraph);
    }
  }
  return out;
}

function inline(text, parent) {
  while (text) {
    let best = null;
    for (const [kind, pattern] of INLINE) {
      const match = pattern.exec(text);
      if (match && (best === null || match.index < best.match.index)) best = { kind, match };
    }
    if (best === null) {
      parent.append(text);
      return;
    }
    const { kind, match } = best;
    if (match.index > 0) parent.append(text.slice(0, match.index));
    parent.append(span(kind, match));
    text = text.slice(match.index + match[0].length);
  }
}

function span(kind, match) {
  if (kind === "code") {
    const code = element("code");
    code.textContent = match[1];
    return code;
  }
  if (kind === "link") {
    const href = webUrl(match[2]);
    if (href === null) return document.createTextNode(match[0]);
    const link = element("a");
    link.href = href;
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
    inline(match[1], link);
    return link;
  }
  const node = element(kind);
  inline(match[1] ?? match[2], node);
  return node;
}

/** The URL if it is an absolute http(s) one; null for javascript:, data:, relative… */
function webUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function element(tag) {
  return document.createElement(tag);
}
