#!/usr/bin/env node
// Tiny launcher: everything lives in dist/ (built by `npm install`).
import('../dist/cli/main.js').then((m) => m.main(process.argv.slice(2)));
