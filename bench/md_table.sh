# shellcheck shell=bash
# md_table.sh - sourced by the bench scripts: reading cells of the markdown tables that `codemoe bench`
# and `llama-bench -o md` print.

# md_get FILE TEST COLUMN: the COLUMN cell of the markdown row whose "test" cell is TEST. Columns are
# found by their header names, so the tools' different column sets parse alike. Prints "-" if absent.
md_get() {
    awk -F'|' -v want="$2" -v col="$3" '
        function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
        /^\|/ {
            if (!hdr) { for (i = 2; i < NF; i++) h[trim($i)] = i; hdr = 1; next }
            if ($0 ~ /^\| *-/ || !("test" in h) || !(col in h)) next
            if (trim($h["test"]) == want) { print trim($h[col]); found = 1; exit }
        }
        END { if (!found) print "-" }' "$1"
}

# mean of a "12.34 ± 0.56" cell, or "-"
mean_of() { awk '{ print ($1 ~ /^[0-9.]+$/) ? $1 : "-" }' <<<"$1"; }
