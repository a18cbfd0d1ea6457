package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"tvixfarm/frontend/pathinfo"
)

const logUsage = `usage: tvixfarm log [--farm ADDR] [--data DIR] DRV|OUTPUT

Prints the full log of the farm's latest build of a derivation (a .drv
path) or of the derivation that built an output path.
`

func logCmd(args []string) error {
	f, err := parseBuildFlags(args)
	if errors.Is(err, errHelp) {
		fmt.Print(logUsage)
		return nil
	}
	if err != nil {
		return fmt.Errorf("log: %v\n\n%s", err, logUsage)
	}
	if len(f.paths) != 1 {
		return fmt.Errorf("log: want one path\n\n%s", logUsage)
	}
	p := f.paths[0]
	if abs, err := filepath.Abs(p); err == nil {
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			p = real
		}
	}
	if !strings.HasPrefix(p, "/nix/store/") {
		return fmt.Errorf("log: %s is not in /nix/store", f.paths[0])
	}
	// A path inside a store path names the store path.
	if rest := strings.TrimPrefix(p, "/nix/store/"); strings.Contains(rest, "/") {
		p = "/nix/store/" + rest[:strings.IndexByte(rest, '/')]
	}
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	fc, err := connect(ctx, f, log)
	if err != nil {
		return err
	}
	defer fc.close()
	drv := p
	if !strings.HasSuffix(p, ".drv") {
		infos, err := fc.farm.Store.Get(ctx, []string{p})
		if err != nil {
			return fmt.Errorf("log: %w", err)
		}
		info := infos[p]
		if info == nil {
			return fmt.Errorf("log: %s is not on the farm", p)
		}
		if info.Deriver == "" {
			return fmt.Errorf("log: %s was not built by a derivation (no deriver)", p)
		}
		drv = info.Deriver
	}
	b, err := fc.farm.Store.GetBuild(ctx, drv)
	if err != nil {
		return fmt.Errorf("log: %w", err)
	}
	if b.Log == nil {
		return fmt.Errorf("log: the build of %s has no log", drv)
	}
	d, err := pathinfo.Digest(b.LogDigestFunction, b.Log)
	if err != nil {
		return fmt.Errorf("log: build record of %s: %w", drv, err)
	}
	r, err := fc.farm.CAS.Get(ctx, d)
	if err != nil {
		return fmt.Errorf("log: reading the log of %s: %w", drv, err)
	}
	defer r.Close()
	_, err = io.Copy(os.Stdout, r)
	return err
}
