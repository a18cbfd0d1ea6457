package coordinator

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"tvixfarm/frontend/translate"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// outputChecks are the reference rules of one output (Nix's "Checks").
type outputChecks struct {
	allowedRefs, allowedReqs, disallowedRefs, disallowedReqs *[]string
	maxSize, maxClosureSize                                  *uint64
	ignoreSelfRefs                                           bool
}

// checksFor returns the rules for output name of d: the env attributes of
// a plain derivation (for every output), or outputChecks.<name> of a
// structured-attrs one.
func checksFor(d *translate.Derivation, name string) (outputChecks, error) {
	var c outputChecks
	js, structured := d.Env["__json"]
	if !structured {
		get := func(k string) *[]string {
			v, ok := d.Env[k]
			if !ok {
				return nil
			}
			l := strings.Fields(v)
			return &l
		}
		c.allowedRefs, c.allowedReqs = get("allowedReferences"), get("allowedRequisites")
		c.disallowedRefs, c.disallowedReqs = get("disallowedReferences"), get("disallowedRequisites")
		c.ignoreSelfRefs = true
		return c, nil
	}
	var attrs struct {
		OutputChecks map[string]struct {
			AllowedReferences    *[]string `json:"allowedReferences"`
			AllowedRequisites    *[]string `json:"allowedRequisites"`
			DisallowedReferences *[]string `json:"disallowedReferences"`
			DisallowedRequisites *[]string `json:"disallowedRequisites"`
			MaxSize              *uint64   `json:"maxSize"`
			MaxClosureSize       *uint64   `json:"maxClosureSize"`
			IgnoreSelfRefs       bool      `json:"ignoreSelfRefs"`
		} `json:"outputChecks"`
	}
	if err := json.Unmarshal([]byte(js), &attrs); err != nil {
		return c, fmt.Errorf("%s: outputChecks: %w", d.Path, err)
	}
	if o, ok := attrs.OutputChecks[name]; ok {
		c = outputChecks{o.AllowedReferences, o.AllowedRequisites, o.DisallowedReferences, o.DisallowedRequisites, o.MaxSize, o.MaxClosureSize, o.IgnoreSelfRefs}
	}
	return c, nil
}

// checkReferences applies the derivation's reference rules to its
// outputs, as Nix 2.8's checkOutputs does.
func checkReferences(d *translate.Derivation, outputs map[string]string, infos []*storepb.PathInfo, closure map[string]*storepb.PathInfo) error {
	all := map[string]*storepb.PathInfo{}
	for p, i := range closure {
		all[p] = i
	}
	for _, i := range infos {
		all[i.StorePath] = i
	}
	closureOf := func(p string) map[string]bool {
		seen := map[string]bool{}
		var walk func(string)
		walk = func(p string) {
			if seen[p] {
				return
			}
			seen[p] = true
			if i := all[p]; i != nil {
				for _, r := range i.References {
					walk(r)
				}
			}
		}
		walk(p)
		return seen
	}
	byPath := map[string]string{}
	for name, p := range outputs {
		byPath[p] = name
	}
	for _, info := range infos {
		c, err := checksFor(d, byPath[info.StorePath])
		if err != nil {
			return err
		}
		if c.maxSize != nil && info.NarSize > *c.maxSize {
			return &BuildError{Msg: fmt.Sprintf("path '%s' is too large at %d bytes; limit is %d bytes", info.StorePath, info.NarSize, *c.maxSize)}
		}
		if c.maxClosureSize != nil {
			var size uint64
			for p := range closureOf(info.StorePath) {
				size += all[p].GetNarSize()
			}
			if size > *c.maxClosureSize {
				return &BuildError{Msg: fmt.Sprintf("closure of path '%s' is too large at %d bytes; limit is %d bytes", info.StorePath, size, *c.maxClosureSize)}
			}
		}
		check := func(spec *[]string, allowed, recursive bool) error {
			if spec == nil {
				return nil
			}
			set := map[string]bool{}
			for _, s := range *spec {
				switch {
				case isStorePath(s):
					set[s] = true
				case outputs[s] != "":
					set[outputs[s]] = true
				default:
					return &BuildError{Msg: fmt.Sprintf("derivation '%s' contains an illegal reference specifier '%s'", d.Path, s)}
				}
			}
			used := map[string]bool{}
			if recursive {
				used = closureOf(info.StorePath)
				if c.ignoreSelfRefs {
					delete(used, info.StorePath)
				}
			} else {
				for _, r := range info.References {
					used[r] = true
				}
			}
			var bad []string
			for p := range used {
				if set[p] != allowed {
					bad = append(bad, p)
				}
			}
			if len(bad) > 0 {
				sort.Strings(bad)
				return &BuildError{Msg: fmt.Sprintf("output '%s' is not allowed to refer to the following paths:\n  %s", info.StorePath, strings.Join(bad, "\n  "))}
			}
			return nil
		}
		for _, k := range []struct {
			spec               *[]string
			allowed, recursive bool
		}{{c.allowedRefs, true, false}, {c.allowedReqs, true, true}, {c.disallowedRefs, false, false}, {c.disallowedReqs, false, true}} {
			if err := check(k.spec, k.allowed, k.recursive); err != nil {
				return err
			}
		}
	}
	return nil
}

// isStorePath reports whether s is a store path (not a path inside one).
func isStorePath(s string) bool {
	rest, ok := strings.CutPrefix(s, translate.StoreDir+"/")
	return ok && len(rest) > 33 && !strings.Contains(rest, "/")
}
