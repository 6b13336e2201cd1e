// Command goclient drives vouchd's Workload API through the go-spiffe v2 SDK, so the interop tests
// prove that an unmodified Go workload works against the agent.
//
// Usage: goclient x509|watch|bundles|jwt, with SPIFFE_ENDPOINT_SOCKET naming the agent's socket.
// A result goes to stdout as JSON. On failure the first line on stderr is "code=<gRPC code name>"
// and the exit status is 1; a usage error exits with 2.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// timeout bounds every mode, so a misbehaving agent fails the test instead of hanging it.
const timeout = 20 * time.Second

type mode func(ctx context.Context) (any, error)

var modes = map[string]mode{
	"x509":    fetchX509Context,
	"watch":   watchRotation,
	"bundles": fetchX509Bundles,
	"jwt":     fetchJWTSVID,
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) != 1 || modes[args[0]] == nil {
		fmt.Fprintln(os.Stderr, "usage: goclient x509|watch|bundles|jwt")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	result, err := modes[args[0]](ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "code=%s\n%v\n", codeName(err), err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
		fmt.Fprintf(os.Stderr, "writing result: %v\n", err)
		return 1
	}
	return 0
}

// codeName names the gRPC status behind err; a deadline that expired on the client side (for
// example during a watch's retry backoff) is not a gRPC status but still has a code.
func codeName(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Code().String()
	}
	return status.FromContextError(err).Code().String()
}

type svidSummary struct {
	SpiffeID           string   `json:"spiffe_id"`
	Serial             string   `json:"serial"` // decimal: 128-bit serials do not fit a JSON number
	NotAfter           int64    `json:"not_after"`
	ChainLength        int      `json:"chain_length"`
	BundleTrustDomains []string `json:"bundle_trust_domains"`
}

func summarize(x509Context *workloadapi.X509Context) svidSummary {
	svid := x509Context.DefaultSVID()
	leaf := svid.Certificates[0]
	return svidSummary{
		SpiffeID:           svid.ID.String(),
		Serial:             leaf.SerialNumber.String(),
		NotAfter:           leaf.NotAfter.Unix(),
		ChainLength:        len(svid.Certificates),
		BundleTrustDomains: trustDomains(x509Context.Bundles),
	}
}

func trustDomains(bundles *x509bundle.Set) []string {
	names := []string{}
	for _, bundle := range bundles.Bundles() {
		names = append(names, bundle.TrustDomain().Name())
	}
	return names
}

func fetchX509Context(ctx context.Context) (any, error) {
	x509Context, err := workloadapi.FetchX509Context(ctx)
	if err != nil {
		return nil, err
	}
	return summarize(x509Context), nil
}

func fetchX509Bundles(ctx context.Context) (any, error) {
	bundles, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		return nil, err
	}
	return trustDomains(bundles), nil
}

// fetchJWTSVID fetches a JWT-SVID for audience "db", has the agent validate it (ValidateJWTSVID),
// and checks it against the JWT bundle the agent serves, as a relying party in Go would.
func fetchJWTSVID(ctx context.Context) (any, error) {
	client, err := workloadapi.New(ctx)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "db"})
	if err != nil {
		return nil, err
	}
	validated, err := client.ValidateJWTSVID(ctx, svid.Marshal(), "db")
	if err != nil {
		return nil, err
	}
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		return nil, err
	}
	parsed, err := jwtsvid.ParseAndValidate(svid.Marshal(), bundles, []string{"db"})
	if err != nil {
		return nil, err
	}
	return map[string]any{"spiffe_id": svid.ID.String(), "audience": svid.Audience,
		"validated": validated.ID.String(), "parsed": parsed.ID.String()}, nil
}

type update struct {
	svidSummary
	Received float64 `json:"received"` // unix seconds, to compare with the previous leaf's not_after
}

// rotationWatcher keeps the first X.509 context and the first later one with a different leaf, then
// stops the watch. The SDK calls it from the goroutine running WatchX509Context only.
type rotationWatcher struct {
	stop    context.CancelFunc
	updates []update
	lastErr error
}

func (w *rotationWatcher) OnX509ContextUpdate(x509Context *workloadapi.X509Context) {
	next := update{svidSummary: summarize(x509Context), Received: float64(time.Now().UnixNano()) / 1e9}
	if len(w.updates) > 0 && w.updates[len(w.updates)-1].Serial == next.Serial {
		return // same SVID re-sent, e.g. because only the bundle changed
	}
	w.updates = append(w.updates, next)
	if len(w.updates) == 2 {
		w.stop()
	}
}

func (w *rotationWatcher) OnX509ContextWatchError(err error) {
	// Keep the error that explains a missing rotation (a status from the agent, an SVID the SDK
	// could not parse), not the cancellation this program causes when it ends the watch.
	if !endedByContext(err) {
		w.lastErr = err
	}
}

func endedByContext(err error) bool {
	code := status.Code(err)
	return code == codes.Canceled || code == codes.DeadlineExceeded ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

func watchRotation(ctx context.Context) (any, error) {
	watchCtx, stop := context.WithCancel(ctx)
	defer stop()
	watcher := &rotationWatcher{stop: stop}

	err := workloadapi.WatchX509Context(watchCtx, watcher)
	if len(watcher.updates) == 2 {
		return watcher.updates, nil
	}
	if watcher.lastErr != nil {
		err = watcher.lastErr
	}
	return nil, fmt.Errorf("watch ended after %d of 2 distinct SVIDs: %w", len(watcher.updates), err)
}
