// jwt.go holds the access token: an HS256 JSON Web Token (RFC 7519) that
// signs the user's email for 30 minutes, built from crypto/hmac,
// crypto/sha256 and encoding/base64 rather than a library, so that every
// check a verifier must make is in plain sight. It knows nothing of users:
// the caller decides whether the token's subject still exists.
//
// A token is three base64url segments joined by dots: a header saying how
// it is signed, the claims, and the HMAC-SHA256 of the first two segments.
// verifyAccessToken makes the checks of RFC 7519 section 7.2 and RFC 8725.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

const (
	accessTokenLifetime = 30 * time.Minute
	maxTokenBytes       = 8 << 10
	minSecretBytes      = 32 // HMAC-SHA256 wants a key at least as long as its output

	// jwtHeader is the base64url encoding of {"alg":"HS256","typ":"JWT"},
	// the header of every token this server issues.
	jwtHeader = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
)

// errInvalidToken is wrapped by every reason a token is refused.
var errInvalidToken = errors.New("invalid token")

// b64 is base64url without padding, strict: trailing bits must be zero, so
// that each token has exactly one spelling.
var b64 = base64.RawURLEncoding.Strict()

// createAccessToken returns a token for email, issued at now and expiring
// 30 minutes later, signed with secret.
func createAccessToken(email string, secret []byte, now time.Time) (string, error) {
	claims, err := json.Marshal(struct {
		Sub string `json:"sub"`
		Iat int64  `json:"iat"`
		Exp int64  `json:"exp"`
	}{email, now.Unix(), now.Add(accessTokenLifetime).Unix()})
	if err != nil {
		return "", fmt.Errorf("encode claims: %w", err)
	}
	signingInput := jwtHeader + "." + b64.EncodeToString(claims)
	return signingInput + "." + b64.EncodeToString(sign(signingInput, secret)), nil
}

// sign returns the HMAC-SHA256 of the signing input under secret.
func sign(signingInput string, secret []byte) []byte {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(signingInput))
	return mac.Sum(nil)
}

// verifyAccessToken checks token at time now and returns its subject, the
// email it was issued for. Every refusal wraps errInvalidToken.
func verifyAccessToken(token string, secret []byte, now time.Time) (string, error) {
	if len(token) > maxTokenBytes {
		return "", fmt.Errorf("%w: longer than %d bytes", errInvalidToken, maxTokenBytes)
	}
	headerSeg, claimsSeg, sigSeg, ok := splitToken(token)
	if !ok {
		return "", fmt.Errorf("%w: not three base64url segments", errInvalidToken)
	}

	var header map[string]json.RawMessage
	if err := decodeSegment(headerSeg, &header); err != nil {
		return "", fmt.Errorf("%w: header: %w", errInvalidToken, err)
	}
	// Only HS256: a token must not choose its own check ("none", or an
	// algorithm whose key could be confused with ours).
	if alg, ok := jsonString(header["alg"]); !ok || alg != "HS256" {
		return "", fmt.Errorf("%w: alg is not HS256", errInvalidToken)
	}
	if raw, present := header["typ"]; present {
		if typ, ok := jsonString(raw); !ok || typ != "JWT" {
			return "", fmt.Errorf("%w: typ is not JWT", errInvalidToken)
		}
	}
	// An extension the token says we must understand is one we do not.
	if _, present := header["crit"]; present {
		return "", fmt.Errorf("%w: crit header present", errInvalidToken)
	}

	// Over the segments as received, compared in constant time.
	sig, err := b64.DecodeString(sigSeg)
	if err != nil || !hmac.Equal(sig, sign(token[:len(headerSeg)+1+len(claimsSeg)], secret)) {
		return "", fmt.Errorf("%w: bad signature", errInvalidToken)
	}

	var claims map[string]json.RawMessage
	if err := decodeSegment(claimsSeg, &claims); err != nil {
		return "", fmt.Errorf("%w: claims: %w", errInvalidToken, err)
	}
	nowSeconds := float64(now.UnixNano()) / 1e9
	exp, ok := jsonNumber(claims["exp"])
	if !ok {
		return "", fmt.Errorf("%w: exp missing or not a number", errInvalidToken)
	}
	if nowSeconds >= exp {
		return "", fmt.Errorf("%w: expired", errInvalidToken)
	}
	if raw, present := claims["nbf"]; present {
		nbf, ok := jsonNumber(raw)
		if !ok || nbf > nowSeconds {
			return "", fmt.Errorf("%w: nbf not a number or in the future", errInvalidToken)
		}
	}
	sub, ok := jsonString(claims["sub"])
	if !ok || sub == "" {
		return "", fmt.Errorf("%w: sub missing or not a non-empty string", errInvalidToken)
	}
	return sub, nil
}

// splitToken splits a compact JWT into its three segments, and reports
// whether there are exactly three and every byte of them is in the base64url
// alphabet. (The base64 decoder alone would skip CR and LF.)
func splitToken(token string) (header, claims, sig string, ok bool) {
	dots := 0
	for i := 0; i < len(token); i++ {
		c := token[i]
		switch {
		case c == '.':
			dots++
		case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return "", "", "", false
		}
	}
	if dots != 2 {
		return "", "", "", false
	}
	header, rest, _ := strings.Cut(token, ".")
	claims, sig, _ = strings.Cut(rest, ".")
	return header, claims, sig, true
}

// decodeSegment decodes a base64url segment holding a JSON object into v.
func decodeSegment(seg string, v *map[string]json.RawMessage) error {
	data, err := b64.DecodeString(seg)
	if err != nil {
		return fmt.Errorf("base64url: %w", err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("JSON: %w", err)
	}
	if *v == nil { // the JSON was null
		return errors.New("JSON: not an object")
	}
	return nil
}

// jsonString returns the value of raw if it is a JSON string.
func jsonString(raw json.RawMessage) (string, bool) {
	var s string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// jsonNumber returns the value of raw if it is a JSON number.
func jsonNumber(raw json.RawMessage) (float64, bool) {
	var f float64
	if len(raw) == 0 || (raw[0] != '-' && (raw[0] < '0' || raw[0] > '9')) || json.Unmarshal(raw, &f) != nil {
		return 0, false
	}
	return f, true
}
