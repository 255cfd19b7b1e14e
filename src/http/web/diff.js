// Unified git diffs, parsed and rendered with file headers, hunk headers, line numbers and
// added/removed lines.

import { h } from './dom.js';

/** At most this many diff lines are put in the page; the rest is counted. */
const MAX_RENDERED_LINES = 4000;

/**
 * Parses `git diff` output into files:
 * `{path, oldPath, status, binary, additions, deletions, hunks: [{header, lines: [{kind, text, old, new}]}]}`
 * where `kind` is `add`, `del`, `ctx` or `note` (`\ No newline at end of file`).
 */
export function parsePatch(text) {
  const files = [];
  let file = null;
  let hunk = null;
  let oldNo = 0;
  let newNo = 0;
  // Lines still expected in the current hunk: a body line is never mistaken for a header.
  let oldLeft = 0;
  let newLeft = 0;
  const lines = String(text ?? '').split('\n');
  if (lines.length && lines[lines.length - 1] === '') lines.pop();
  for (const line of lines) {
    if (hunk && (oldLeft > 0 || newLeft > 0)) {
      const mark = line[0];
      const body = line.slice(1);
      if (mark === '+') {
        hunk.lines.push({ kind: 'add', text: body, old: null, new: newNo++ });
        file.additions += 1;
        newLeft -= 1;
      } else if (mark === '-') {
        hunk.lines.push({ kind: 'del', text: body, old: oldNo++, new: null });
        file.deletions += 1;
        oldLeft -= 1;
      } else if (mark === '\\') {
        hunk.lines.push({ kind: 'note', text: line, old: null, new: null });
      } else {
        hunk.lines.push({ kind: 'ctx', text: body, old: oldNo++, new: newNo++ });
        oldLeft -= 1;
        newLeft -= 1;
      }
      continue;
    }
    if (hunk && line.startsWith('\\')) {
      hunk.lines.push({ kind: 'note', text: line, old: null, new: null });
      continue;
    }
    if (line.startsWith('diff --git ')) {
      const m = /^diff --git a\/(.*) b\/(.*)$/.exec(line);
      file = {
        path: m ? m[2] : line.slice(11),
        oldPath: m ? m[1] : null,
        status: 'modified',
        binary: false,
        additions: 0,
        deletions: 0,
        hunks: [],
      };
      files.push(file);
      hunk = null;
      continue;
    }
    if (!file) continue;
    const hunkHeader = /^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@/.exec(line);
    if (hunkHeader) {
      oldNo = Number(hunkHeader[1]);
      oldLeft = hunkHeader[2] === undefined ? 1 : Number(hunkHeader[2]);
      newNo = Number(hunkHeader[3]);
      newLeft = hunkHeader[4] === undefined ? 1 : Number(hunkHeader[4]);
      hunk = { header: line, lines: [] };
      file.hunks.push(hunk);
      continue;
    }
    if (hunk) continue;
    if (line.startsWith('new file mode')) file.status = 'added';
    else if (line.startsWith('deleted file mode')) file.status = 'deleted';
    else if (line.startsWith('rename from ')) file.oldPath = line.slice('rename from '.length);
    else if (line.startsWith('rename to ')) {
      file.status = 'renamed';
      file.path = line.slice('rename to '.length);
    } else if (line.startsWith('Binary files ') || line === 'GIT binary patch') file.binary = true;
  }
  return files;
}

const SIGN = { add: '+', del: '−', ctx: ' ', note: ' ' };
const LABEL = { add: 'added', del: 'removed' };

/** The rendered diff: one section per file. `statuses` maps paths to the Diff event's status. */
export function renderPatch(text, statuses = new Map()) {
  const files = parsePatch(text);
  let budget = MAX_RENDERED_LINES;
  let hidden = 0;
  const sections = files.map((file) => {
    const status = statuses.get(file.path) ?? file.status;
    const header = h(
      'h4',
      { class: 'diff-file-header' },
      h('span', { class: 'file-status', dataset: { status } }, status),
      h('code', { class: 'file-path' }, file.oldPath && status === 'renamed' ? `${file.oldPath} → ${file.path}` : file.path),
      h('span', { class: 'file-counts' },
        h('span', { class: 'count-add', 'aria-label': `${file.additions} lines added` }, `+${file.additions}`),
        ' ',
        h('span', { class: 'count-del', 'aria-label': `${file.deletions} lines removed` }, `−${file.deletions}`)),
    );
    const body = h('table', { class: 'diff-table' });
    const rows = h('tbody');
    body.append(rows);
    if (file.binary) {
      rows.append(h('tr', { class: 'diff-note' }, h('td', { colspan: 4 }, 'Binary file')));
    }
    for (const hunk of file.hunks) {
      if (budget <= 0) {
        hidden += hunk.lines.length;
        continue;
      }
      rows.append(h('tr', { class: 'diff-hunk' }, h('td', { colspan: 4 }, hunk.header)));
      for (const line of hunk.lines) {
        if (budget <= 0) {
          hidden += 1;
          continue;
        }
        budget -= 1;
        rows.append(
          h('tr', { class: `diff-line diff-${line.kind}` },
            h('td', { class: 'ln', 'aria-hidden': 'true' }, line.old ?? ''),
            h('td', { class: 'ln', 'aria-hidden': 'true' }, line.new ?? ''),
            h('td', { class: 'sign' }, LABEL[line.kind] ? h('span', { 'aria-label': LABEL[line.kind] }, SIGN[line.kind]) : SIGN[line.kind]),
            h('td', { class: 'code' }, line.text)),
        );
      }
    }
    return h('section', { class: 'diff-file', dataset: { path: file.path } }, header, h('div', { class: 'diff-scroll' }, body));
  });
  const out = h('div', { class: 'diff' }, sections);
  if (hidden > 0) {
    out.append(h('p', { class: 'help' }, `${hidden} more diff lines are not shown here; the whole patch is at GET /jobs/{id}/patch.`));
  }
  if (files.length === 0) out.append(h('p', { class: 'help' }, 'The patch is empty.'));
  return out;
}

/**
 * A small diff of one edit (`Tool: Edit`): unchanged leading and trailing lines as context,
 * the rest as removed and added lines.
 */
export function renderEdit(oldStr, newStr, maxLines = 40) {
  const before = oldStr === '' ? [] : String(oldStr).split('\n');
  const after = String(newStr).split('\n');
  let head = 0;
  while (head < before.length && head < after.length && before[head] === after[head]) head += 1;
  let tail = 0;
  while (
    tail < before.length - head &&
    tail < after.length - head &&
    before[before.length - 1 - tail] === after[after.length - 1 - tail]
  ) tail += 1;
  const lines = [
    ...before.slice(0, head).map((text) => ['ctx', text]),
    ...before.slice(head, before.length - tail).map((text) => ['del', text]),
    ...after.slice(head, after.length - tail).map((text) => ['add', text]),
    ...after.slice(after.length - tail).map((text) => ['ctx', text]),
  ];
  // A trailing newline splits into a last empty line: not worth a row.
  if (lines.length > 1 && lines[lines.length - 1][1] === '' && lines[lines.length - 1][0] !== 'del') lines.pop();
  const shown = lines.slice(0, maxLines);
  const pre = h('pre', { class: 'mini-diff' },
    shown.map(([kind, text]) => h('span', { class: `diff-${kind}` }, `${SIGN[kind]} ${text}\n`)));
  if (lines.length > shown.length) {
    pre.append(h('span', { class: 'diff-note' }, `… ${lines.length - shown.length} more lines\n`));
  }
  return pre;
}
