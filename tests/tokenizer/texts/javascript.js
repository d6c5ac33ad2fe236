'use strict';

const DEFAULTS = Object.freeze({ retries: 3, backoffMs: 250, timeoutMs: 5_000 });

/**
 * fetch() with retries and exponential backoff.
 * @param {string} url
 * @param {RequestInit & {retries?: number}} [opts]
 */
export async function fetchWithRetry(url, opts = {}) {
  const { retries, backoffMs, timeoutMs, ...init } = { ...DEFAULTS, ...opts };
  let lastErr;
  for (let attempt = 0; attempt <= retries; attempt++) {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), timeoutMs);
    try {
      const res = await fetch(url, { ...init, signal: ctrl.signal });
      if (res.status >= 500) throw new Error(`HTTP ${res.status} from ${url}`);
      return res;
    } catch (err) {
      lastErr = err;
      await new Promise((r) => setTimeout(r, backoffMs * 2 ** attempt));
    } finally {
      clearTimeout(timer);
    }
  }
  throw lastErr ?? new Error('unreachable');
}

const sum = (xs) => xs.reduce((a, b) => a + b, 0);
console.log(sum([1, 2, 3]) === 6 ? 'ok' : 'bad', /^[a-z]+\d{2,}$/i.test('abc123'));
