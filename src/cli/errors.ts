// What every command module shares and the entry point needs before it loads any of them:
// exit codes, the error a command throws to end with a message, and where output goes.
// Kept free of imports, so `--help` and argument errors load nothing else.

/**
 * Exit codes scripts can trust (kubectl's): 0 fine; 1 problems found, differences, changes to
 * make, or a thing that does not exist; 2 usage, configuration or runtime error (bad arguments,
 * a missing file or database, an unreachable daemon or engine).
 */
export const EXIT = { OK: 0, PROBLEMS: 1, ERROR: 2 } as const;

/** A failure the CLI reports as `error: MESSAGE` and exits with exitCode. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = EXIT.ERROR,
  ) {
    super(message);
  }
}

export interface Io {
  out(text: string): void;
  err(text: string): void;
}
