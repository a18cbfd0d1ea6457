package state

import (
	"cmp"
	"slices"
	"strconv"
	"strings"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// requirement is one platform property an operation needs from a worker.
type requirement struct {
	name string
	// value is the property's value; for a list key, its features joined
	// by commas.
	value string
	// features is the sorted set of features of a list key; nil otherwise.
	features []string
}

func (r requirement) String() string { return r.name + "=" + r.value }

// requirements appends to reqs what a worker must offer to run an
// operation with platform, sorted, and appends its canonical key to key.
// Apply passes buffers of the State to save allocations; queries, which may
// run concurrently, pass nil.
func (s *State) requirements(platform []*schedulerpb.Property, reqs []requirement, key []byte) ([]requirement, []byte) {
	start := len(reqs)
	for _, p := range platform {
		if s.ignored[p.GetName()] {
			continue
		}
		r := requirement{name: p.GetName(), value: p.GetValue()}
		if s.list[r.name] {
			r.features = splitList(r.value)
			if len(r.features) == 0 {
				continue
			}
			r.value = strings.Join(r.features, ",")
		}
		reqs = append(reqs, r)
	}
	rs := reqs[start:]
	slices.SortFunc(rs, func(a, b requirement) int {
		return cmp.Or(strings.Compare(a.name, b.name), strings.Compare(a.value, b.value))
	})
	rs = slices.CompactFunc(rs, func(a, b requirement) bool { return a.name == b.name && a.value == b.value })
	for i, r := range rs {
		if i > 0 {
			key = append(key, ',')
		}
		key = appendToken(key, r.name)
		key = append(key, '=')
		key = appendToken(key, r.value)
	}
	return reqs[:start+len(rs)], key
}

// appendToken appends v to a platform key: as is if it has no character
// special in keys (so it cannot start with a quote), quoted otherwise.
func appendToken(key []byte, v string) []byte {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == ',' || c == '=' {
			return strconv.AppendQuote(key, v)
		}
	}
	return append(key, v...)
}

// splitList returns the sorted set of the non-empty comma-separated
// elements of v.
func splitList(v string) []string {
	if v == "" {
		return nil
	}
	fs := strings.Split(v, ",")
	n := 0
	for _, f := range fs {
		if f = strings.TrimSpace(f); f != "" {
			fs[n] = f
			n++
		}
	}
	fs = fs[:n]
	slices.Sort(fs)
	return slices.Compact(fs)
}

// offers is what a worker offers: the set of values of each property name;
// for list keys, the union of the features of its values.
type offers map[string]map[string]struct{}

func (s *State) offers(platform []*schedulerpb.Property) offers {
	o := make(offers)
	for _, p := range platform {
		vs := o[p.GetName()]
		if vs == nil {
			vs = make(map[string]struct{})
			o[p.GetName()] = vs
		}
		if s.list[p.GetName()] {
			for _, f := range splitList(p.GetValue()) {
				vs[f] = struct{}{}
			}
		} else {
			vs[p.GetValue()] = struct{}{}
		}
	}
	return o
}

// has reports whether o offers value (a feature, for list keys) for name.
func (o offers) has(name, value string) bool {
	_, ok := o[name][value]
	return ok
}

// satisfies reports whether o satisfies r.
func (o offers) satisfies(r requirement) bool {
	if r.features == nil {
		return o.has(r.name, r.value)
	}
	for _, f := range r.features {
		if !o.has(r.name, f) {
			return false
		}
	}
	return true
}

// satisfy reports whether o satisfies all of reqs.
func (o offers) satisfy(reqs []requirement) bool {
	for _, r := range reqs {
		if !o.satisfies(r) {
			return false
		}
	}
	return true
}

// Unsatisfiable reports whether no registered worker (drained or not) could
// run an operation with platform. If so, key and value name the first
// property, in sorted order, that no worker offers (for a list key, the
// first missing element). If every property is offered by some worker but
// none offers them all, key is empty and value says so, as it does when no
// worker is registered.
func (s *State) Unsatisfiable(platform []*schedulerpb.Property) (key, value string, ok bool) {
	reqs, _ := s.requirements(platform, nil, nil)
	anyOffers := func(name, value string) bool {
		for _, w := range s.workers {
			if w.offers.has(name, value) {
				return true
			}
		}
		return false
	}
	for _, r := range reqs {
		if r.features == nil {
			if !anyOffers(r.name, r.value) {
				return r.name, r.value, true
			}
			continue
		}
		for _, f := range r.features {
			if !anyOffers(r.name, f) {
				return r.name, f, true
			}
		}
	}
	for _, w := range s.workers {
		if w.offers.satisfy(reqs) {
			return "", "", false
		}
	}
	if len(s.workers) == 0 {
		return "", "no workers are registered", true
	}
	names := make([]string, len(reqs))
	for i, r := range reqs {
		names[i] = r.String()
	}
	return "", "no single worker offers all of " + strings.Join(names, ", "), true
}
